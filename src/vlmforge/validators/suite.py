"""Runs every check of an artifact set against its PyTorch source; returns structured results."""

from __future__ import annotations

import logging
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmforge.core.contracts import KVLayout, StageContract
from vlmforge.core.errors import RecipeError
from vlmforge.runtime.engine import Engine
from vlmforge.validators import chain, contract, parity
from vlmforge.host.image import ImageParams
from vlmforge.validators.reference import Reference
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
    fp32_directory: Path | None = None  # the FP32 graphs behind transformed ones (checks vs FP32 ONNX)


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


def engine_for(directory: Path, contracts: dict[str, StageContract], providers=None, fallback: Path | None = None) -> Engine:
    """Engine over `directory`; a stage missing there is taken from `fallback` (FP32 stages of a mixed build)."""
    layout = KVLayout.from_contract(contracts["decoder"])

    def path(stage: str) -> Path:
        p = directory / f"{stage}.onnx"
        return p if p.exists() or fallback is None else fallback / f"{stage}.onnx"

    return Engine(path("vision"), path("embedding"), path("decoder"), layout, list(providers) if providers else None)


def run_suite(inp: SuiteInputs, hf_model, source_path: Path, vcfg, images) -> SuiteResult:
    """Contract, preprocessing, per-graph parity and the chain, in that order (cheap first).

    For a DeepStack-drop variant every check runs against HF with DeepStack off (what the graphs compute);
    the deviation from HF with DeepStack on is then measured and returned as `variant`, never as a pass."""
    results: list[CheckResult] = []
    for stage, c in inp.contracts.items():
        results += contract.check_contract(inp.directory / f"{stage}.onnx", c)
    if not all(r.passed for r in results):
        log.error("a graph does not match its contract: the numeric checks cannot run on it")
        return SuiteResult(results)
    engine = engine_for(inp.directory, inp.contracts, inp.providers)
    ref = Reference(inp.family_key, hf_model, source_path, inp.params)
    scope = inp.deepstack_off(hf_model) if inp.deepstack_off else contextlib.nullcontext()
    with scope:
        results += _parity_and_chain(inp, engine, ref, vcfg, images)
    if inp.fp32_directory is not None:
        results += _versus_fp32_onnx(inp, engine, ref, vcfg, images)
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
    if vcfg.task_questions:
        from vlmforge.validators.task import check_task

        log.info("validating task accuracy on %d held-out questions", vcfg.task_questions)
        results += check_task(engine, ref, vcfg.task_questions, tolerance(vcfg.tolerances, "task", worst))
    return results


def _versus_fp32_onnx(inp: SuiteInputs, engine: Engine, ref: Reference, vcfg, images) -> list[CheckResult]:
    """Each transformed graph against the FP32 ONNX graph it came from, on the same real inputs."""
    from vlmforge.validators.metrics import compare

    base = engine_for(inp.fp32_directory, _fp32_contracts(inp.contracts), inp.providers, fallback=inp.directory)
    out: list[CheckResult] = []
    img = images[0]
    pv, grid = ref.hf_pixels(img)
    if inp.precisions["vision"] != "fp32":
        got, _ = engine.encode_image(pv.numpy(), grid.numpy())
        want, _ = base.encode_image(pv.numpy(), grid.numpy())
        out += compare("vision", "image_features vs FP32 ONNX", got, want,
                       tolerance(vcfg.tolerances, "vision", inp.precisions["vision"]))
    feats, ds = base.encode_image(pv.numpy(), grid.numpy())
    ids = np.asarray([ref.prompt_ids(vcfg.prompt, 1)], np.int64)
    if inp.precisions["embedding"] != "fp32":
        got, _ = engine.embed(ids, feats, ds)
        want, _ = base.embed(ids, feats, ds)
        out += compare("embedding", "inputs_embeds vs FP32 ONNX", got, want,
                       tolerance(vcfg.tolerances, "embedding", inp.precisions["embedding"]))
    if inp.precisions["decoder"] != "fp32":
        emb, deep = base.embed(ids, feats, ds)
        from vlmforge.host import mrope

        pos, _ = mrope.rope_index(ids, None, grid.numpy(), image_token_id=ref.config.image_token_id,
                                  vision_start_token_id=ref.config.vision_start_token_id,
                                  spatial_merge_size=ref.params.merge_size)
        got, _ = engine.decode(emb, np.ones_like(ids), pos, engine.empty_past(1), deep)
        want, _ = base.decode(emb, np.ones_like(ids), pos, base.empty_past(1), deep)
        out += compare("decoder", "prefill logits vs FP32 ONNX", got, want,
                       tolerance(vcfg.tolerances, "decoder", inp.precisions["decoder"]), logits=True)
    return out


def _fp32_contracts(contracts: dict[str, StageContract]) -> dict[str, StageContract]:
    return {k: c.with_float_dtype("float32") for k, c in contracts.items()}


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
