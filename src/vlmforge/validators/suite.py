"""Runs every check of an artifact set against its PyTorch source; returns structured results."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmforge.core.contracts import KVLayout, StageContract
from vlmforge.core.errors import RecipeError
from vlmforge.core.memory import give_back, rss_note
from vlmforge.runtime.engine import Engine
from vlmforge.validators import chain, contract, parity
from vlmforge.host.dynamic import DynamicImageParams
from vlmforge.host.image import ImageParams
from vlmforge.validators.graphs import staged_engine
from vlmforge.validators.reference import Reference, grid_tokens
from vlmforge.validators.results import CheckResult

log = logging.getLogger(__name__)

PRECISION_ORDER = ("fp32", "fp16", "int4")


@dataclass(frozen=True)
class SuiteInputs:
    family_key: str
    directory: Path
    contracts: dict[str, StageContract]
    precisions: dict[str, str]  # stage -> fp32|fp16|int4
    params: ImageParams | DynamicImageParams
    deepstack: bool
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    deepstack_off: Callable[[Any], Any] | None = None  # set for a `deepstack: drop` variant
    fp32_directory: Path | None = None  # the FP32 graphs behind transformed ones (checks vs FP32 ONNX)
    fp32_stages: tuple[str, ...] = ()  # the stages whose FP32 graph is there (an INT4 decoder exported straight
    # to INT4 has none: it is compared with PyTorch FP32, as with the streamed reference)
    # INT4 stage -> {FP32 weight name: array_fingerprint of that weight} (its transform's record): how the same-weight
    # check finds, in the PyTorch model, the weight each quantized one came from
    source_weights: dict = field(default_factory=dict)
    # how the PyTorch reference holds its weights (vlmforge.loading.reference_kind). "streamed": the build is
    # bounded to less than the FP32 model, so the FP32 decoder graph is not opened either: a transformed decoder
    # is compared with PyTorch FP32 on the same prompt instead (named so in the check)
    reference: str = "resident"


@dataclass
class SuiteResult:
    checks: list[CheckResult]
    variant: dict = field(default_factory=dict)  # measured facts about a deliberately non-equivalent variant


def tolerance(tolerances: dict, stage: str, precision: str, weights: str = "trained") -> dict:
    """The recipe's tolerance of `stage` at `precision`; on random weights (validate.weights=random) its
    `<precision>_random` entry where there is one (the quality sanity bounds of transformed graphs)."""
    if weights == "random" and f"{precision}_random" in tolerances.get(stage, {}):
        precision = f"{precision}_random"
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


@dataclass
class References:
    """What the reference pass keeps of the PyTorch model's outputs: inputs, features, logits rows, tokens."""
    preprocess: list[CheckResult]
    vision: list[dict]
    embedding: dict
    decoder: dict
    chain: list[dict]
    task: list[str] | None = None
    deviation: list[dict] = field(default_factory=list)  # DeepStack on, per image (a `deepstack: drop` variant)
    same_weights: dict = field(default_factory=dict)  # INT4 stages: PyTorch with the graphs' dequantized weights
    fp32_prefill: object = None  # streamed reference, transformed decoder: PyTorch FP32 logits on the versus input


def run_suite(inp: SuiteInputs, load_model: Callable[[], Any], source_path: Path, vcfg, images) -> SuiteResult:
    """Contract, preprocessing, per-graph parity and the chain, in that order (cheap first).

    Two passes, so that the PyTorch model and the ONNX weights are never resident together: the reference
    pass calls `load_model()`, runs the model on every validation input, keeps only the outputs the checks
    compare against (References) and frees the model; the graph pass then runs the graphs, one stage's
    session at a time. `load_model` must hand over the only reference to the model (the caller keeps none).

    For a DeepStack-drop variant every check runs against HF with DeepStack off (what the graphs compute);
    the deviation from HF with DeepStack on is then measured and returned as `variant`, never as a pass."""
    results: list[CheckResult] = []
    for stage, c in inp.contracts.items():
        results += contract.check_contract(inp.directory / f"{stage}.onnx", c)
    if not all(r.passed for r in results):
        log.error("a graph does not match its contract: the numeric checks cannot run on it")
        return SuiteResult(results)
    ref, refs = reference_pass(inp, load_model, source_path, vcfg, images)
    checks, variant = graph_pass(inp, ref, refs, vcfg, images)
    return SuiteResult(results + checks, variant)


def reference_pass(inp: SuiteInputs, load_model, source_path: Path, vcfg, images) -> tuple[Reference, References]:
    """The PyTorch side of every check, with the model resident; the model is freed before returning."""
    t = time.perf_counter()
    ref = Reference(inp.family_key, load_model(), source_path, inp.params)
    try:
        log.info("reference pass: PyTorch on the validation inputs")
        with _model_state(inp, ref, deepstack_off=True):
            refs = _references(inp, ref, vcfg, images)
        with _model_state(inp, ref, deepstack_off=False):
            if inp.deepstack_off:
                refs.deviation = [chain.reference_chain(ref, vcfg.prompt, [img], vcfg.chain_tokens) for img in images]
            if _decoder_versus_pytorch(inp):
                refs.fp32_prefill = _fp32_prefill(ref, vcfg, images)
        if _same_weight_stages(inp):  # last: it changes the weights
            with _model_state(inp, ref, deepstack_off=True):
                refs.same_weights = _same_weight_references(inp, ref, vcfg, images)
    finally:
        ref.release()
        give_back()
    log.info("reference pass done in %.1f s; PyTorch model freed (%s)", time.perf_counter() - t, rss_note())
    return ref, refs


@contextlib.contextmanager
def _model_state(inp: SuiteInputs, ref: Reference, deepstack_off: bool):
    """The model as a group of references needs it: DeepStack off (`deepstack_off` and a drop variant) or as it
    is. The reference's kept vision outputs start and end empty: the tower's outputs depend on that state."""
    ref.forget_vision()
    try:
        with (inp.deepstack_off(ref.model) if deepstack_off and inp.deepstack_off else contextlib.nullcontext()):
            yield
    finally:
        ref.forget_vision()


def _references(inp: SuiteInputs, ref: Reference, vcfg, images) -> References:
    pre = parity.check_preprocess(ref, images, tolerance(vcfg.tolerances, "preprocess", "fp32"))
    log.info("reference: vision (%d images; %s)", len(images), rss_note())
    vision = parity.reference_vision(ref, images, inp.params.dynamic)
    log.info("reference: embedding and decoder (prefill + %d decode steps; %s)", vcfg.decode_steps, rss_note())
    embedding = parity.reference_embedding(ref, vision[0], inp.deepstack)
    decoder = parity.reference_decoder(ref, vision[0], inp.deepstack, vcfg.decode_steps)
    cases = _chain_cases(vcfg, images, inp.params.dynamic)
    log.info("reference: HF generate (%d tokens, %d prompts; %s)", vcfg.chain_tokens, len(cases), rss_note())
    wants = [chain.reference_chain(ref, p, imgs, vcfg.chain_tokens) for _, p, imgs in cases]
    task = None
    if vcfg.task_questions:
        from vlmforge.validators.task import reference_task

        log.info("reference: %d held-out questions", vcfg.task_questions)
        task = reference_task(ref, vcfg.task_questions)
    return References(pre, vision, embedding, decoder, wants, task)


def _decoder_versus_pytorch(inp: SuiteInputs) -> bool:
    """A transformed decoder is compared with PyTorch FP32 on the versus-FP32 prompt, not with an FP32 decoder
    graph: with the streamed reference (a session of that graph would hold every FP32 weight) and where there is
    no FP32 decoder graph (exported straight to INT4)."""
    if inp.fp32_directory is None or inp.precisions["decoder"] == "fp32":
        return False
    return inp.reference == "streamed" or "decoder" not in inp.fp32_stages


def _fp32_prefill(ref: Reference, vcfg, images) -> np.ndarray:
    """PyTorch FP32 logits on fp32_outputs' input (the chat prompt with the first image, batch 1)."""
    pv, grid = ref.hf_pixels(images[0])
    ids = np.asarray([ref.prompt_ids(vcfg.prompt, 1, grid_tokens(grid.numpy(), ref.params.merge_size))], np.int64)
    return ref.logits(ids, np.ones_like(ids), pv, grid)


def _same_weight_stages(inp: SuiteInputs) -> list[str]:
    """The INT4 stages whose transform recorded its source weights: those the same-weight check can load into the
    PyTorch model (a re-validated set has no records, so none)."""
    return [s for s, p in inp.precisions.items() if p == "int4" and inp.source_weights.get(s)]


def _same_weight_references(inp: SuiteInputs, ref: Reference, vcfg, images) -> dict:
    """The INT4 stages' dequantized weights loaded into the model (in place: the model is freed after this),
    then the vision and decoder references again (validators/same_weights.py)."""
    from vlmforge.validators.same_weights import load_into

    out: dict = {"loaded": {}}
    for stage in _same_weight_stages(inp):
        out["loaded"][stage] = load_into(ref.model, inp.directory / f"{stage}.onnx", inp.source_weights[stage])
    ref.forget_vision()  # the vision outputs kept so far were computed with the FP32 weights
    log.info("reference: PyTorch with the INT4 graphs' weights (%s; %s)", ", ".join(out["loaded"]), rss_note())
    vision = parity.reference_vision(ref, images[:1])
    if inp.precisions["vision"] == "int4":
        out["vision"] = vision
    if inp.precisions["decoder"] == "int4":
        out["decoder"] = parity.reference_decoder(ref, vision[0], inp.deepstack, vcfg.decode_steps)
    return out


def _same_weight_checks(engine, inp: SuiteInputs, refs: References, vcfg, stage: str) -> list[CheckResult]:
    """An INT4 graph against PyTorch running its own (dequantized) weights: kind "graph", on any weights."""
    from vlmforge.validators.metrics import gate
    from vlmforge.validators.results import at_least, at_most

    sw = refs.same_weights
    if stage not in sw.get("loaded", {}):
        return []
    replaced, unmatched, steps = sw["loaded"][stage]
    tol = tolerance(vcfg.tolerances, stage, "int4_weights")
    found = [at_most(stage, "INT4 weights found in the PyTorch model", "unmatched_weights", len(unmatched), 0,
                     detail=f"{replaced} loaded; unmatched: {', '.join(unmatched[:5]) or 'none'}"),
             at_least(stage, "INT4 weights found in the PyTorch model", "loaded_weights", replaced, 1)]
    found += gate(stage, "dequantized INT4 weights vs FP32 weights", {"max_step_error": steps},
                  {k: v for k, v in tol.items() if k == "max_step_error"})
    if stage == "vision":
        checks = parity.check_vision(engine, sw["vision"], tol, inp.deepstack)
    elif stage == "decoder":
        checks = parity.check_decoder(engine, sw["decoder"], tol)
    else:
        checks = []
    return found + [dataclasses.replace(c, name=f"{c.name}, PyTorch with the graph's INT4 weights") for c in checks]


def _chain_cases(vcfg, images, dynamic: bool = False) -> list[tuple[str, str, list]]:
    """(name, prompt, images) of each chain check. A dynamic set: every validation image (each aspect ratio)
    alone, the text prompt, and the first two images (different sizes) in one prompt."""
    if not dynamic:
        return [("image + chat prompt", vcfg.prompt, [images[0]]), ("text only", vcfg.text_prompt, [])]
    size = lambda img: f"{img.size[0]}x{img.size[1]}"  # noqa: E731
    cases = [(f"image {i} ({size(img)}) + chat prompt", vcfg.prompt, [img]) for i, img in enumerate(images)]
    cases.append(("text only", vcfg.text_prompt, []))
    if len(images) >= 2:
        cases.append((f"two images ({size(images[0])}, {size(images[1])}) + chat prompt", vcfg.prompt, images[:2]))
    return cases


def graph_pass(inp: SuiteInputs, ref: Reference, refs: References, vcfg, images) -> tuple[list[CheckResult], dict]:
    """The graphs against the stored references: FP32 graphs first (their outputs only), then each transformed
    stage alone, then the chain with all three sessions. Results keep the order of the checks' list."""
    t = time.perf_counter()
    tol = lambda stage: tolerance(vcfg.tolerances, stage, inp.precisions.get(stage, "fp32"), vcfg.weights)  # noqa: E731
    worst = max(inp.precisions.values(), key=PRECISION_ORDER.index)
    base = fp32_outputs(inp, ref, vcfg, images, refs) if inp.fp32_directory is not None else None
    engine = staged_engine(inp.directory, inp.contracts, inp.providers)
    results, versus = list(refs.preprocess), []
    log.info("graph pass: vision (%s)", rss_note())
    results += parity.check_vision(engine.keep("vision"), refs.vision, tol("vision"), inp.deepstack)
    versus += _versus(engine, base, inp, vcfg, "vision")
    same = _same_weight_checks(engine, inp, refs, vcfg, "vision")
    log.info("graph pass: embedding (%s)", rss_note())
    results += parity.check_embedding(engine.keep("embedding"), refs.embedding, tol("embedding"), inp.deepstack)
    versus += _versus(engine, base, inp, vcfg, "embedding")
    log.info("graph pass: decoder (%s)", rss_note())
    results += parity.check_decoder(engine.keep("decoder"), refs.decoder, tol("decoder"))
    versus += _versus(engine, base, inp, vcfg, "decoder")
    same += _same_weight_checks(engine, inp, refs, vcfg, "decoder")
    log.info("graph pass: the chain against HF generate (%d tokens; %s)", vcfg.chain_tokens, rss_note())
    engine.exclusive_vision = True  # the chain only: reopening per prompt is cheap beside its generate
    results += chain.check_chain(engine, ref, _chain_cases(vcfg, images, inp.params.dynamic), refs.chain,
                                 vcfg.chain_tokens,
                                 tolerance(vcfg.tolerances, "chain", worst, vcfg.weights))
    engine.exclusive_vision = False  # the task questions (hundreds of one-image prompts) keep their sessions
    if vcfg.task_questions:
        from vlmforge.validators.task import check_task

        log.info("validating task accuracy on %d held-out questions", vcfg.task_questions)
        results += check_task(engine, ref, vcfg.task_questions, refs.task, tolerance(vcfg.tolerances, "task", worst))
    variant = _deepstack_drop_deviation(engine, ref, vcfg, images, refs.deviation) if inp.deepstack_off else {}
    engine.close()
    log.info("graph pass done in %.1f s (%s)", time.perf_counter() - t, rss_note())
    return kinds(results + versus, inp) + same, variant


def kinds(checks: list[CheckResult], inp: SuiteInputs) -> list[CheckResult]:
    """Which question each check answers: "graph" (is the graph right: the weights on both sides are the
    same, so it holds on any weights) or "quality" (how far a transformed graph is from FP32: meaningful on
    trained weights only, a sanity bound on random ones). Task accuracy is always "quality"."""
    transformed = {s for s, p in inp.precisions.items() if p != "fp32"}
    worst = max(inp.precisions.values(), key=PRECISION_ORDER.index)

    def kind(c: CheckResult) -> str:
        if c.stage == "task" or c.stage in transformed or (c.stage == "chain" and worst != "fp32"):
            return "quality"
        return "graph"

    return [dataclasses.replace(c, kind=kind(c)) for c in checks]


def fp32_outputs(inp: SuiteInputs, ref: Reference, vcfg, images, refs: References | None = None) -> dict:
    """The FP32 ONNX graphs behind the transformed ones, on the versus-FP32 inputs: one session at a time,
    closed before the transformed sessions open; only their outputs are kept. A streamed reference: the FP32
    decoder graph is not opened (it alone would hold the FP32 decoder's weights); its logits are PyTorch's."""
    base = staged_engine(inp.fp32_directory, _fp32_contracts(inp.contracts), inp.providers, fallback=inp.directory)
    pv, grid = ref.hf_pixels(images[0])
    o = {"pv": pv.numpy(), "grid": grid.numpy()}
    o["feats"], o["ds"] = base.keep("vision").encode_image(o["pv"], o["grid"])
    o["ids"] = np.asarray([ref.prompt_ids(vcfg.prompt, 1, grid_tokens(o["grid"], ref.params.merge_size))], np.int64)
    o["emb"], o["deep"] = base.keep("embedding").embed(o["ids"], o["feats"], o["ds"])
    if inp.precisions["decoder"] != "fp32":
        from vlmforge.host import mrope

        o["pos"], _ = mrope.rope_index(o["ids"], None, o["grid"], image_token_id=ref.config.image_token_id,
                                       vision_start_token_id=ref.config.vision_start_token_id,
                                       spatial_merge_size=ref.params.merge_size)
        if _decoder_versus_pytorch(inp):
            why = "validate.reference=streamed" if inp.reference == "streamed" else "no FP32 decoder graph"
            o["logits"], o["against"] = refs.fp32_prefill, f"FP32 PyTorch ({why})"
        else:
            dec = base.keep("decoder")
            o["logits"], _ = dec.decode(o["emb"], np.ones_like(o["ids"]), o["pos"], dec.empty_past(1), o["deep"])
    base.close()
    return o


def _versus(engine, base: dict | None, inp: SuiteInputs, vcfg, stage: str) -> list[CheckResult]:
    """One transformed graph against the FP32 ONNX graph it came from, on the same real inputs."""
    from vlmforge.validators.metrics import compare

    if base is None or inp.precisions[stage] == "fp32":
        return []
    tol = tolerance(vcfg.tolerances, stage, inp.precisions[stage], vcfg.weights)
    if stage == "vision":
        got, _ = engine.encode_image(base["pv"], base["grid"])
        return compare("vision", "image_features vs FP32 ONNX", got, base["feats"], tol)
    if stage == "embedding":
        got, _ = engine.embed(base["ids"], base["feats"], base["ds"])
        return compare("embedding", "inputs_embeds vs FP32 ONNX", got, base["emb"], tol)
    ones = np.ones_like(base["ids"])
    got, _ = engine.decode(base["emb"], ones, base["pos"], engine.empty_past(1), base["deep"])
    return compare("decoder", f"prefill logits vs {base.get('against', 'FP32 ONNX')}", got, base["logits"], tol,
                   logits=True)


def _fp32_contracts(contracts: dict[str, StageContract]) -> dict[str, StageContract]:
    return {k: c.with_float_dtype("float32") for k, c in contracts.items()}


def _deepstack_drop_deviation(engine: Engine, ref: Reference, vcfg, images, wants: list[dict]) -> dict:
    """How far the DeepStack-free graphs are from the real model (HF with DeepStack on), per image."""
    log.info("measuring the deviation of the DeepStack-free variant from HF with DeepStack on")
    rows = []
    for i, (img, want) in enumerate(zip(images, wants, strict=True)):
        tokens, logits, hf_tokens, hf_logits = chain.run_chain(engine, ref, want, [img], vcfg.chain_tokens)
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
