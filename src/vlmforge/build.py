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
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for stage in STAGES:
            t = time.perf_counter()
            log.info("[%s] exporting %s", final, stage)
            family.stage(stage).export(model, options, staging / f"{stage}.onnx")
            timings[f"export.{stage}"] = time.perf_counter() - t
        _copy_runtime_files(source.path, staging)
        params = image_params(source.path, model.config, image_size)
        write_runtime_configs(staging, family.key, model.config, contracts, params, deepstack)
        checks: list[CheckResult] = []
        variant: dict = {}
        if cfg.validate.enabled:
            t = time.perf_counter()
            checks, variant = _validate(cfg, family, staging, contracts, params, deepstack, model, source.path)
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
        if variant:
            manifest["variant"] = variant
        write_manifest(staging, manifest)
        _publish(staging, final)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    timings["total"] = time.perf_counter() - t0
    _write_build_log(final, timings)
    return BuildReport(final, True, checks, timings)


def _validate(cfg, family, staging, contracts, params, deepstack, model, source_path):
    from vlmforge.validators.suite import SuiteInputs, run_suite

    precisions = {s: getattr(cfg.precision, s) for s in STAGES}
    dropped = cfg.model.deepstack == "drop" and family.deepstack_layers(model.config) > 0
    inp = SuiteInputs(family.key, staging, contracts, precisions, params, deepstack, tuple(cfg.target.providers),
                      deepstack_off=family.deepstack_off if dropped else None)
    result = run_suite(inp, model, source_path, cfg.validate, validation_images(cfg.validate))
    return result.checks, result.variant


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
