"""Runs every check of an artifact set against its PyTorch source; returns structured results."""

from __future__ import annotations

import logging
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

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
    deepstack_off: Callable[[Any], Any] | None = None  # set for a `deepstack: drop` variant


@dataclass
class SuiteResult:
    checks: list[CheckResult]
    variant: dict = field(default_factory=dict)  # measured facts about a deliberately non-equivalent variant


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


def run_suite(inp: SuiteInputs, hf_model, source_path: Path, vcfg, images) -> SuiteResult:
    """Contract, preprocessing, per-graph parity and the chain, in that order (cheap first).

    For a DeepStack-drop variant every check runs against HF with DeepStack off (what the graphs compute);
    the deviation from HF with DeepStack on is then measured and returned as `variant`, never as a pass."""
    results: list[CheckResult] = []
    for stage, c in inp.contracts.items():
        results += contract.check_contract(inp.directory / f"{stage}.onnx", c)
    engine = engine_for(inp.directory, inp.contracts, inp.providers)
    ref = Reference(inp.family_key, hf_model, source_path, inp.params)
    scope = inp.deepstack_off(hf_model) if inp.deepstack_off else contextlib.nullcontext()
    with scope:
        results += _parity_and_chain(inp, engine, ref, vcfg, images)
    variant = _deepstack_drop_deviation(engine, ref, vcfg, images) if inp.deepstack_off else {}
    return SuiteResult(results, variant)


def _parity_and_chain(inp: SuiteInputs, engine: Engine, ref: Reference, vcfg, images) -> list[CheckResult]:
    tol = lambda stage: tolerance(vcfg.tolerances, stage, inp.precisions.get(stage, "fp32"))  # noqa: E731
    worst = max(inp.precisions.values(), key=PRECISION_ORDER.index)
    log.info("validating preprocessing and vision")
    results = parity.check_preprocess(ref, images, tolerance(vcfg.tolerances, "preprocess", "fp32"))
    results += parity.check_vision(engine, ref, images, tol("vision"), inp.deepstack)
    log.info("validating embedding and decoder")
    results += parity.check_embedding(engine, ref, images[0], tol("embedding"), inp.deepstack)
    results += parity.check_decoder(engine, ref, images[0], tol("decoder"), inp.deepstack, vcfg.decode_steps)
    log.info("validating the chain against HF generate (%d tokens)", vcfg.chain_tokens)
    cases = [("image + chat prompt", vcfg.prompt, [images[0]]), ("text only", vcfg.text_prompt, [])]
    results += chain.check_chain(engine, ref, cases, vcfg.chain_tokens, tolerance(vcfg.tolerances, "chain", worst))
    return results


def _deepstack_drop_deviation(engine: Engine, ref: Reference, vcfg, images) -> dict:
    """How far the DeepStack-free graphs are from the real model (HF with DeepStack on), per image."""
    log.info("measuring the deviation of the DeepStack-free variant from HF with DeepStack on")
    rows = []
    for i, img in enumerate(images):
        tokens, logits, hf_tokens, hf_logits = chain.run_chain(engine, ref, vcfg.prompt, [img], vcfg.chain_tokens)
        first = next((k for k, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), None)
        upto = max(first if first is not None else len(hf_tokens), 1)
        rows.append({
            "image": i,
            "greedy_token_agreement": sum(a == b for a, b in zip(tokens, hf_tokens)) / len(hf_tokens),
            "first_divergent_step": first,
            "first_step_logits_max_abs": float(np.max(np.abs(logits[0] - hf_logits[0]))),
            "logits_max_abs_until_divergence": float(np.max(np.abs(logits[:upto] - hf_logits[:upto]))),
            "first_step_argmax_equal": bool(logits[0].argmax() == hf_logits[0].argmax()),
        })
    worst_logit = max(r["first_step_logits_max_abs"] for r in rows)
    agree = min(r["greedy_token_agreement"] for r in rows)
    return {
        "deepstack": "dropped",
        "equivalent_to_source": False,
        "statement": (
            "This artifact set omits the DeepStack features, so it does not compute what the source model computes. "
            f"Measured against the source model with DeepStack on: first-step logits differ by up to {worst_logit:.3g} "
            f"and greedy decoding agrees on {agree:.0%} of {vcfg.chain_tokens} tokens (worst image). "
            "Its graphs were validated against the source model with DeepStack switched off."
        ),
        "deviation_from_source": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
