"""Runs every check of an artifact set against its PyTorch source; returns structured results."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vlmforge.contracts import StageContract
from vlmforge.errors import RecipeError
from vlmforge.runtime.engine import Engine, KVLayout
from vlmforge.validators import chain, contract, parity
from vlmforge.validators.reference import ImageParams, Reference
from vlmforge.validators.results import CheckResult

log = logging.getLogger(__name__)

PRECISION_ORDER = ("fp32", "fp16", "int4")


@dataclass(frozen=True)
class SuiteInputs:
    family_key: str
    directory: Path
    contracts: dict[str, StageContract]
    precisions: dict[str, str]  # stage -> fp32|fp16|int4
    params: ImageParams
    deepstack: bool
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def tolerance(tolerances: dict, stage: str, precision: str) -> dict:
    try:
        return dict(tolerances[stage][precision])
    except KeyError:
        raise RecipeError(
            f"no tolerance for stage {stage!r} at precision {precision!r}",
            where="recipe key validate.tolerances",
            fix=f"add validate.tolerances.{stage}.{precision} to the validate recipe",
        ) from None


def engine_for(directory: Path, contracts: dict[str, StageContract], providers=None) -> Engine:
    meta = contracts["decoder"].meta
    layout = KVLayout(meta["num_layers"], meta["kv_heads"], meta["head_dim"], meta.get("deepstack_layers", 0), meta["hidden"])
    return Engine(directory / "vision.onnx", directory / "embedding.onnx", directory / "decoder.onnx", layout,
                  list(providers) if providers else None)


def run_suite(inp: SuiteInputs, hf_model, source_path: Path, vcfg, images) -> list[CheckResult]:
    """Contract, preprocessing, per-graph parity and the chain, in that order (cheap first)."""
    results: list[CheckResult] = []
    for stage, c in inp.contracts.items():
        results += contract.check_contract(inp.directory / f"{stage}.onnx", c)
    engine = engine_for(inp.directory, inp.contracts, inp.providers)
    ref = Reference(inp.family_key, hf_model, source_path, inp.params)
    tol = lambda stage: tolerance(vcfg.tolerances, stage, inp.precisions.get(stage, "fp32"))  # noqa: E731
    worst = max(inp.precisions.values(), key=PRECISION_ORDER.index)
    log.info("validating preprocessing and vision")
    results += parity.check_preprocess(ref, images, tolerance(vcfg.tolerances, "preprocess", "fp32"))
    results += parity.check_vision(engine, ref, images, tol("vision"), inp.deepstack)
    log.info("validating embedding and decoder")
    results += parity.check_embedding(engine, ref, images[0], tol("embedding"), inp.deepstack)
    results += parity.check_decoder(engine, ref, images[0], tol("decoder"), inp.deepstack, vcfg.decode_steps)
    log.info("validating the chain against HF generate (%d tokens)", vcfg.chain_tokens)
    cases = [("image + chat prompt", vcfg.prompt, [images[0]]), ("text only", vcfg.text_prompt, [])]
    results += chain.check_chain(engine, ref, cases, vcfg.chain_tokens, tolerance(vcfg.tolerances, "chain", worst))
    return results
