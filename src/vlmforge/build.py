"""run_build(BuildConfig) -> BuildReport: export stages into a staging directory, validate them against
PyTorch, write the manifest last, publish by rename.

A failed or interrupted build never leaves a directory that looks complete: until the final rename the
work lives in `.<name>.staging-*`; a build whose checks fail is moved to `<name>.failed/` without a
manifest (its `validation.json` says what failed), so `vlmforge verify` rejects it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge import __version__
from vlmforge.config import BuildConfig, resolve_image_size, to_dict
from vlmforge.errors import RecipeError, ValidationFailed
from vlmforge.manifest import hash_files, toolchain, write_manifest
from vlmforge.registry import STAGES, get_family
from vlmforge.runtime.genai_config import write_runtime_configs
from vlmforge.source import TOKENIZER_FILES, load_model, open_source
from vlmforge.validators.reference import image_params
from vlmforge.validators.results import CheckResult

log = logging.getLogger(__name__)

RUNTIME_FILES = TOKENIZER_FILES + ("preprocessor_config.json", "generation_config.json")


@dataclass(frozen=True)
class StageOptions:
    image_size: int
    deepstack: bool


@dataclass
class BuildReport:
    directory: Path
    passed: bool
    checks: list[CheckResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def artifact_dir(cfg: BuildConfig, image_size: int) -> Path:
    suffix = "-nodeepstack" if cfg.model.deepstack == "drop" else ""
    name = cfg.name or f"{cfg.precision.name}-{image_size}{suffix}"
    return Path(cfg.out_dir) / cfg.model.name / name


def run_build(cfg: BuildConfig, recipe: str = "recipes/build.yaml") -> BuildReport:
    family = get_family(cfg.model.family, where=f"{recipe}: model.family")
    image_size = resolve_image_size(cfg.vision.size, family, f"{recipe}: vision.size")
    check_target(cfg, recipe)
    if cfg.model.deepstack == "drop" and family.deepstack_off is None:
        raise RecipeError(f"model.deepstack=drop: {family.display_name} has no DeepStack", where=recipe,
                          fix="leave model.deepstack=keep (drop applies to Qwen3-VL)")
    final = artifact_dir(cfg, image_size)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # Everything that can be checked without writing is checked first: a bad input leaves no directory.
    source = open_source(cfg.model.checkpoint, family.key, cfg.model.revision, Path(cfg.cache_dir),
                         f"{recipe}: model.checkpoint")
    model = load_model(source, cfg.model.trust_remote_code, cfg.model.load_dtype)
    deepstack = family.deepstack_layers(model.config) > 0 and cfg.model.deepstack == "keep"
    options = StageOptions(image_size=image_size, deepstack=deepstack)
    contracts = {s: family.stage(s).contract(model.config, options) for s in STAGES}
    timings["load"] = time.perf_counter() - t0

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.staging-{os.getpid()}"
    fp32_dir = final.parent / f".{final.name}.fp32-{os.getpid()}"  # FP32 graphs behind transformed ones
    for d in (staging, fp32_dir):
        if d.exists():
            shutil.rmtree(d)
    staging.mkdir()
    transformed = any(getattr(cfg.precision, s) != "fp32" for s in STAGES)
    try:
        transforms: dict[str, dict] = {}
        for stage in STAGES:
            t = time.perf_counter()
            log.info("[%s] exporting %s", final, stage)
            precision = getattr(cfg.precision, stage)
            target_dir = fp32_dir if precision != "fp32" else staging
            target_dir.mkdir(exist_ok=True)
            family.stage(stage).export(model, options, target_dir / f"{stage}.onnx")
            timings[f"export.{stage}"] = time.perf_counter() - t
            if precision != "fp32":
                t = time.perf_counter()
                log.info("[%s] transforming %s to %s", final, stage, precision)
                transforms[stage] = apply_precision(stage, precision, cfg.precision, fp32_dir, staging,
                                                    model.config.text_config.vocab_size)
                contracts[stage] = precision_contract(contracts[stage], precision, cfg.precision)
                timings[f"transform.{stage}"] = time.perf_counter() - t
        _copy_runtime_files(source.path, staging)
        params = image_params(source.path, model.config, image_size)
        write_runtime_configs(staging, family.key, model.config, contracts, params, deepstack)
        checks: list[CheckResult] = []
        variant: dict = {}
        if cfg.validate.enabled:
            t = time.perf_counter()
            checks, variant = _validate(cfg, family, staging, contracts, params, deepstack, model, source.path,
                                        fp32_dir if transformed else None)
            timings["validate"] = time.perf_counter() - t
        passed = all(c.passed for c in checks)
        if not passed:
            failed_dir = _park_failed(staging, final, checks)
            bad = [c for c in checks if not c.passed]
            raise ValidationFailed(
                f"{len(bad)} of {len(checks)} checks failed: " + "; ".join(f"{c.stage}/{c.name} {c.metric}={c.value} > {c.tolerance}" for c in bad[:4]),
                where=str(failed_dir / "validation.json"),
                fix="inspect the failing stage; tolerances live in recipes/validate/*.yaml (never loosen them to pass)",
            )
        manifest = _manifest(cfg, family.key, source, contracts, params, checks, staging)
        for stage, record in transforms.items():
            manifest["components"][stage]["transform"] = record
        if variant:
            manifest["variant"] = variant
        write_manifest(staging, manifest)
        _publish(staging, final)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)
    timings["total"] = time.perf_counter() - t0
    _write_build_log(final, timings)
    return BuildReport(final, True, checks, timings)


def _validate(cfg, family, staging, contracts, params, deepstack, model, source_path, fp32_dir):
    from vlmforge.validators.suite import SuiteInputs, run_suite

    precisions = {s: getattr(cfg.precision, s) for s in STAGES}
    dropped = cfg.model.deepstack == "drop" and family.deepstack_layers(model.config) > 0
    inp = SuiteInputs(family.key, staging, contracts, precisions, params, deepstack, tuple(cfg.target.providers),
                      deepstack_off=family.deepstack_off if dropped else None, fp32_directory=fp32_dir)
    result = run_suite(inp, model, source_path, cfg.validate, validation_images(cfg.validate))
    return result.checks, result.variant


def check_target(cfg: BuildConfig, recipe: str) -> None:
    """The target must be able to run what the recipe asks for, before any work starts."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in cfg.target.providers if p not in available and p != "CPUExecutionProvider"]
    if missing and not cfg.target.allow_fallback:
        raise RecipeError(
            f"target {cfg.target.name!r} needs {missing}, which this onnxruntime ({ort.__version__}) does not have "
            f"(available: {available})", where=f"{recipe}: target",
            fix="install the matching onnxruntime package (e.g. onnxruntime-gpu) or choose target=cpu")
    for stage in STAGES:
        p = getattr(cfg.precision, stage)
        if p not in cfg.target.precisions:
            raise RecipeError(
                f"precision.{stage}={p} cannot run on target {cfg.target.name!r}",
                where=f"{recipe}: precision.{stage}",
                fix=f"target {cfg.target.name} runs {list(cfg.target.precisions)}; pick one of those or another target")
    if "int4" in {getattr(cfg.precision, s) for s in STAGES}:
        from vlmforge.transforms.quantize_int4 import check_int4_config

        check_int4_config(cfg.precision.int4, f"{recipe}: precision.int4")


def apply_precision(stage: str, precision: str, pcfg, src_dir: Path, dst_dir: Path, vocab: int) -> dict:
    src, dst = src_dir / f"{stage}.onnx", dst_dir / f"{stage}.onnx"
    if precision == "fp16":
        from vlmforge.transforms.cast_fp16 import cast_fp16

        record = cast_fp16(src, dst, fp16_io=pcfg.fp16_io)
    else:
        from vlmforge.transforms.quantize_int4 import quantize_int4

        record = quantize_int4(src, dst, pcfg.int4, vocab=vocab if stage == "decoder" else None, stage=stage)
    fp32_bytes = _graph_bytes(src)
    record.update(fp32_bytes=fp32_bytes, bytes=_graph_bytes(dst), size_ratio=round(_graph_bytes(dst) / fp32_bytes, 4))
    return record


def _graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def precision_contract(contract, precision: str, pcfg):
    return contract.with_float_dtype("float16") if precision == "fp16" and pcfg.fp16_io else contract


def validation_images(vcfg) -> list:
    from vlmforge.runtime.preprocess import load_image

    if vcfg.images:
        return [load_image(p) for p in vcfg.images]
    from vlmforge.fixtures.images import sample_image

    return [sample_image(seed, size=(500, 500)) for seed in vcfg.image_seeds]


def _copy_runtime_files(src: Path, dst: Path) -> None:
    for name in RUNTIME_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _manifest(cfg, family_key, source, contracts, params, checks, staging: Path) -> dict:
    comps = {}
    for stage, c in contracts.items():
        comp = {"file": f"{stage}.onnx", "precision": getattr(cfg.precision, stage), **c.to_json()}
        if stage == "vision":
            comp.update(image_size=params.size, tokens_per_image=params.tokens_per_image,
                        grid_thw=[1, params.size // params.patch_size, params.size // params.patch_size],
                        preprocess=params.to_json())
        comps[stage] = comp
    mc = load_config_ids(source.config)
    return {
        "schema_version": 1,
        "vlmforge_version": __version__,
        "family": family_key,
        "source": {"checkpoint": cfg.model.checkpoint, "revision": cfg.model.revision, "weights": source.weight_files},
        "recipe": to_dict(cfg),
        "toolchain": toolchain(),
        "components": comps,
        "files": hash_files(staging),
        "token_ids": mc,
        "validation": {"passed": all(c.passed for c in checks) and bool(checks), "checks": [c.to_json() for c in checks]},
    }


def load_config_ids(config: dict) -> dict:
    text = config.get("text_config", {})
    eos = text.get("eos_token_id", config.get("eos_token_id"))
    return {
        "image": config["image_token_id"],
        "vision_start": config["vision_start_token_id"],
        "vision_end": config["vision_end_token_id"],
        "eos": eos,
        "pad": text.get("pad_token_id", config.get("pad_token_id")),
        "bos": text.get("bos_token_id", config.get("bos_token_id")),
    }


def _publish(staging: Path, final: Path) -> None:
    """Rename into place; an older artifact set at `final` is replaced only after the new one is whole."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(staging, final)
    failed = final.parent / f"{final.name}.failed"
    if failed.exists():
        shutil.rmtree(failed, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _park_failed(staging: Path, final: Path, checks: list[CheckResult]) -> Path:
    failed = final.parent / f"{final.name}.failed"
    if failed.exists():
        shutil.rmtree(failed)
    (staging / "validation.json").write_text(json.dumps([c.to_json() for c in checks], indent=2) + "\n")
    os.rename(staging, failed)
    return failed


def _write_build_log(final: Path, timings: dict) -> None:
    """Wall-clock facts go beside the artifact set, never into the manifest (which must be reproducible)."""
    logs = final.parent / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"{final.name}.json").write_text(json.dumps({"seconds": timings}, indent=2, sort_keys=True) + "\n")
