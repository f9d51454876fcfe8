"""run_build(BuildConfig) -> BuildReport: export stages (or take them from the stage cache) into a staging
directory, validate them against PyTorch (or take the cached verdict), publish by rename, manifest last.

A failed or interrupted build never leaves a directory that `vlmforge verify` accepts: until the final
rename the work lives in `.<name>.staging-<host>-<pid>` (no manifest there, ever); the manifest is written
into the published directory after the rename, atomically; a build whose checks fail is moved to
`<name>.failed/` without a manifest (its `validation.json` says what failed). The next build removes the
working folders of dead builds and reuses every stage they finished (vlmforge/cache.py).

The PyTorch model is loaded only when something needs it (an export, or a validation not cached): a build
whose stages and validation are all cached reads the checkpoint's config and hashes, nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge import __version__
from vlmforge.cache import (STAGE_READS, Entry, StageCache, digest, export_inputs, owner_tag, remove_stale, source_inputs,
                            transform_inputs, validation_inputs)
from vlmforge.config import BuildConfig, resolve_image_size, to_dict
from vlmforge.core.errors import CheckpointError, RecipeError, ValidationFailed, VlmforgeError, as_os_error, from_os_error
from vlmforge.core.hashing import sha256_file
from vlmforge.core.paths import check_name, make_dir
from vlmforge.artifact.manifest import MANIFEST, hash_files, toolchain, validate_manifest, write_manifest
from vlmforge.progress import QUIET, Progress
from vlmforge.registry import STAGES, get_family
from vlmforge.artifact.runtime_configs import write_runtime_configs
from vlmforge.host.image import image_params
from vlmforge.source import TOKENIZER_FILES, check_model_size, checkpoint_file, load_model, open_source
from vlmforge.validators.results import CheckResult

log = logging.getLogger(__name__)

RUNTIME_FILES = TOKENIZER_FILES + ("preprocessor_config.json", "generation_config.json")
# Working folders beside the artifact sets: `.<name>.<kind>-<host>-<pid>`.
WORK_DIR = re.compile(r"^\..+\.(?:staging|fp32|old)-(?P<tag>.+)$")
VALIDATION_FILE = "validation.json"
FAILED_MARKER = ".vlmforge-failed"  # written into `<name>.failed/`: the build only ever replaces its own
LOGS = "logs"  # beside the artifact sets of a model: per-build timings


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
    # vision/embedding/decoder -> cached | built | transformed (transform rebuilt, its FP32 export cached);
    # validation -> cached | built | off
    cache: dict[str, str] = field(default_factory=dict)
    model_loaded: bool = False

    def cache_summary(self) -> str:
        """e.g. "3/3 stages + validation", "1/3 stages", "2/3 stages (1 from cached FP32)"."""
        stages = [s for s in STAGES if s in self.cache]
        hits = sum(self.cache[s] == "cached" for s in stages)
        reused = sum(self.cache[s] == "transformed" for s in stages)
        text = f"{hits}/{len(stages)} stages" + (f" ({reused} from cached FP32)" if reused else "")
        return text + (" + validation" if self.cache.get("validation") == "cached" else "")


def artifact_dir(cfg: BuildConfig, image_size: int, recipe: str = "recipe") -> Path:
    """`<out_dir>/<model.name>/<name>`. Both names are single plain folder names, so a set can only land
    inside out_dir, and never on the logs folder or a working folder."""
    suffix = "-nodeepstack" if cfg.model.deepstack == "drop" else ""
    fix = "use letters, digits, '.', '_', '+' or '-' (no '/', no leading '.'), e.g. name=fp32-392-test"
    model = check_name(cfg.model.name, "model.name", f"{recipe}: model.name", RecipeError, fix)
    name = check_name(cfg.name or f"{cfg.precision.name}-{image_size}{suffix}", "name", f"{recipe}: name",
                      RecipeError, fix)
    if name == LOGS or name.endswith(".failed"):
        raise RecipeError(f"name={name!r} is reserved (the build writes {LOGS}/ and <name>.failed/ itself)",
                          where=f"{recipe}: name", fix="choose another name")
    return Path(cfg.out_dir) / model / name


def check_replaceable(final: Path) -> None:
    """The build replaces `final` only if it made it: absent, an empty folder, or an artifact set (a folder
    with its own manifest.json). Anything else is the user's, and is never deleted."""
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise RecipeError(f"{final} exists and is not an artifact folder (a file or a link)", where=str(final),
                          fix="choose another name=... or out_dir=..., or move that path away yourself")
    manifest = final / MANIFEST
    if any(final.iterdir()) and not (manifest.is_file() and not manifest.is_symlink()):
        raise RecipeError(f"{final} exists, is not empty and is not a vlmforge artifact set (no {MANIFEST}); "
                          "vlmforge will not replace it", where=str(final),
                          fix="choose another name=... or out_dir=..., or move that folder away yourself")


def run_build(cfg: BuildConfig, recipe: str = "recipes/build.yaml", force: bool = False,
              progress: Progress | None = None) -> BuildReport:
    """Build one artifact set. `force` ignores (and replaces) every cache entry; `progress` draws the live
    status line (default: none, log lines only)."""
    family = get_family(cfg.model.family, where=f"{recipe}: model.family")
    image_size = resolve_image_size(cfg.vision.size, family, f"{recipe}: vision.size")
    check_target(cfg, recipe)
    if cfg.model.deepstack == "drop" and family.deepstack_off is None:
        raise RecipeError(f"model.deepstack=drop: {family.display_name} has no DeepStack", where=recipe,
                          fix="leave model.deepstack=keep (drop applies to Qwen3-VL)")
    t0 = time.perf_counter()
    # Everything that can be checked without writing is checked first: a bad input leaves no directory.
    final = artifact_dir(cfg, image_size, recipe)
    check_replaceable(final)
    source = open_source(cfg.model.checkpoint, family.key, cfg.model.revision, Path(cfg.cache_dir),
                         f"{recipe}: model.checkpoint")
    run = _Run(cfg, family, source, final, image_size, StageCache(Path(cfg.cache_dir), force), progress or QUIET)
    run.timings["load"] = time.perf_counter() - t0
    run.check_plan(recipe)
    report = run.execute()
    report.seconds["total"] = time.perf_counter() - t0
    _write_build_log(report.directory, report.seconds, report.cache)
    return report


def cache_keys(cfg: BuildConfig, recipe: str = "recipes/build.yaml") -> dict:
    """The cache keys a build of `cfg` uses, computed without a model and without writing anything:
    {"export": {stage: key}, "final": {stage: key}, "validation": key}."""
    family = get_family(cfg.model.family, where=f"{recipe}: model.family")
    image_size = resolve_image_size(cfg.vision.size, family, f"{recipe}: vision.size")
    source = open_source(cfg.model.checkpoint, family.key, cfg.model.revision, Path(cfg.cache_dir),
                         f"{recipe}: model.checkpoint")
    run = _Run(cfg, family, source, artifact_dir(cfg, image_size, recipe), image_size, StageCache(Path(cfg.cache_dir)),
               QUIET)
    return {"export": run.export_key, "final": run.final_key, "validation": run.validation_key}


class _Run:
    """One build: the plan (keys), the lazily loaded model, and the steps that fill the staging folder."""

    def __init__(self, cfg, family, source, final: Path, image_size: int, cache: StageCache, progress: Progress):
        self.cfg, self.family, self.source, self.final, self.cache, self.progress = cfg, family, source, final, cache, progress
        self.timings: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self._model = None
        self.model_loaded = False
        self.hf_config = load_hf_config(source, cfg.model.trust_remote_code)
        family.check_checkpoint_config(self.hf_config, str(source.path / "config.json"))
        self.parameters = check_model_size(source, self.hf_config)
        self.deepstack = family.deepstack_layers(self.hf_config) > 0 and cfg.model.deepstack == "keep"
        self.options = StageOptions(image_size=image_size, deepstack=self.deepstack)
        self.contracts = {s: family.stage(s).contract(self.hf_config, self.options) for s in STAGES}
        self.precision = {s: getattr(cfg.precision, s) for s in STAGES}
        # The plan: one cache key per FP32 export, per transform, and for the validation of the whole set.
        tools, src = toolchain(), source_inputs(source)
        self.export_in = {s: export_inputs(family, s, self.options, cfg, src, tools) for s in STAGES}
        self.export_key = {s: digest(i) for s, i in self.export_in.items()}
        self.final_in = {s: (self.export_in[s] if p == "fp32" else transform_inputs(s, p, cfg.precision, self.export_key[s]))
                         for s, p in self.precision.items()}
        self.final_key = {s: digest(i) for s, i in self.final_in.items()}
        self.validation_in = validation_inputs(family, self.final_key, self.export_key, cfg, source.path, RUNTIME_FILES)
        self.validation_key = digest(self.validation_in)
        tag = owner_tag()
        self.staging = final.parent / f".{final.name}.staging-{tag}"
        self.scratch = final.parent / f".{final.name}.fp32-{tag}"  # FP32 graphs behind transformed ones
        self.cached_checks: tuple[list[CheckResult], dict] | None = None
        self.validation_short = ""
        self.exported: set[str] = set()  # stages whose FP32 export ran in this build (not taken from the cache)

    def bytes_needed(self) -> int:
        """Disk a build of this model needs: the FP32 set, and as much again for the stage cache when it
        shares the file system (transformed sets are smaller: an upper bound)."""
        one = self.parameters * 4 + (16 << 20)
        try:
            same = os.stat(Path(self.cfg.cache_dir)).st_dev == os.stat(self.final.parent).st_dev
        except OSError:
            same = True
        return one * (2 if same else 1)

    def check_plan(self, recipe: str) -> None:
        from vlmforge.launch.plan import check_plan, make_plan

        cached = lambda stage, key: not self.cache.force and (self.cache.slot(self.family.key, stage) / key).is_dir()  # noqa: E731
        needs_model = not all(cached(s, self.export_key[s]) for s in STAGES) or (
            self.cfg.validate.enabled and not cached("validation", self.validation_key))
        plan = make_plan(self.parameters, self.precision, self.cfg.validate.enabled, needs_model, self.bytes_needed(),
                         self.final.parent)
        check_plan(plan, f"{recipe}: model.checkpoint={self.cfg.model.checkpoint}", self.cfg.memory_check)

    # -- the model, on demand ---------------------------------------------------------------------------------------
    def model(self, why: str):
        if self._model is None:
            t = time.perf_counter()
            log.info("loading the PyTorch model from %s (for %s)", self.source.path, why)
            with self.progress.step("loading the PyTorch model"):
                self._model = load_model(self.source, self.cfg.model.trust_remote_code, self.cfg.model.load_dtype)
            self.timings["load_model"] = time.perf_counter() - t
            self.model_loaded = True
        return self._model

    def take_model(self):
        """The model, handed over: the build keeps no reference, so the validation frees it after its
        reference pass (a later export would load it again)."""
        model, self._model = self.model("validation"), None
        return model

    # -- the build --------------------------------------------------------------------------------------------------
    def execute(self) -> BuildReport:
        final = self.final
        make_dir(final.parent, "the artifact folder", "out_dir")
        remove_stale(final.parent, WORK_DIR)
        for d in (self.staging, self.scratch):
            if d.exists():
                shutil.rmtree(d)
        self.staging.mkdir()
        try:
            self.cached_checks = self._cached_validation()
            transforms = {s: r for s in STAGES if (r := self._stage(s)) is not None}
            contracts = {s: precision_contract(c, self.precision[s], self.cfg.precision) for s, c in self.contracts.items()}
            _copy_runtime_files(self.source.path, self.staging)
            params = image_params(self.source.path, self.hf_config, self.options.image_size,
                                  self.family.image.mean, self.family.image.std)
            write_runtime_configs(self.staging, self.family.key, self.family.genai_type, self.hf_config, contracts, params,
                                  self.deepstack)
            checks, variant = self._validation(contracts, params)
            if not all(c.passed for c in checks):
                failed_dir = _park_failed(self.staging, final, checks)
                bad = [c for c in checks if not c.passed]
                raise ValidationFailed(
                    f"{len(bad)} of {len(checks)} checks failed: " + "; ".join(f"{c.stage}/{c.name} {c.metric}={c.value} > {c.tolerance}" for c in bad[:4]),
                    where=str(failed_dir / VALIDATION_FILE),
                    fix="inspect the failing stage; tolerances live in recipes/validate/*.yaml (never loosen them to pass)",
                )
            manifest = _manifest(self.cfg, self.family.key, self.source, contracts, params, checks, self.staging)
            for stage, record in transforms.items():
                manifest["components"][stage]["transform"] = record
            if variant:
                manifest["variant"] = variant
            validate_manifest(manifest, str(self.staging / MANIFEST))  # before the rename: a bad manifest publishes nothing
            _publish(self.staging, final, manifest)
        except BaseException as exc:
            if self.staging.exists():
                shutil.rmtree(self.staging, ignore_errors=True)
            oserr = as_os_error(exc) if isinstance(exc, Exception) and not isinstance(exc, VlmforgeError) else None
            if oserr is not None:  # disk full, read-only, ...: say where and how much, not a traceback
                raise from_os_error(oserr, "building the artifact set", where=oserr.filename or str(final.parent),
                                    needed=self.bytes_needed()) from None
            raise
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        return BuildReport(final, True, checks, self.timings, dict(self.status), self.model_loaded)

    def _stage(self, stage: str) -> dict | None:
        """Put `stage` into staging; return its transform record (None for FP32)."""
        precision = self.precision[stage]
        if precision == "fp32":
            entry, hit = self._export(stage, label=stage)
            entry.materialize(self.staging)
            self.status[stage] = "cached" if hit else "built"
            return None

        def fill(tmp: Path) -> dict:
            self._fp32_graph(stage)
            log.info("%s: transforming to %s", stage, precision)
            t = time.perf_counter()
            with self.progress.step(f"{stage}: {precision} transform"):
                record = apply_precision(stage, precision, self.cfg.precision, self.scratch, tmp,
                                         self.hf_config.text_config.vocab_size)
            self.timings[f"transform.{stage}"] = time.perf_counter() - t
            return {"transform": record}

        key = self.final_key[stage]
        entry, hit = self.cache.get_or_build(self.family.key, f"{stage}.{precision}", key, self.final_in[stage], fill)
        if hit:
            log.info("%s: up to date (cache %s)", stage, entry.short)
        else:
            log.info("%s: %s transform done in %.1f s (cache %s)", stage, precision,
                     self.timings.get(f"transform.{stage}", 0.0), entry.short)
        if self.cfg.validate.enabled and self.cached_checks is None:
            self._fp32_graph(stage)  # validation compares the transformed graph with its FP32 graph
        entry.materialize(self.staging)
        self.status[stage] = "cached" if hit else ("built" if stage in self.exported else "transformed")
        return entry.record["transform"]

    def _fp32_graph(self, stage: str) -> None:
        """The FP32 export of `stage` in the scratch folder (hardlinked from the cache; exported if missing)."""
        if not (self.scratch / f"{stage}.onnx").exists():
            entry, _ = self._export(stage, label=f"{stage} (FP32 export)")
            entry.materialize(self.scratch, link=True)

    def _export(self, stage: str, label: str) -> tuple[Entry, bool]:
        def fill(tmp: Path) -> dict:
            model = self.model(f"the {stage} export")
            log.info("%s: exporting", label)
            t = time.perf_counter()
            with self.progress.step(f"{stage}: exporting"):
                self.family.stage(stage).export(model, stage_options(stage, self.options), tmp / f"{stage}.onnx")
            self.timings[f"export.{stage}"] = time.perf_counter() - t
            return {"contract": self.contracts[stage].to_json()}

        entry, hit = self.cache.get_or_build(self.family.key, stage, self.export_key[stage], self.export_in[stage], fill)
        if not hit:
            self.exported.add(stage)
        if hit:
            log.info("%s: up to date (cache %s)", label, entry.short)
        else:
            log.info("%s: exported in %.1f s (cache %s)", label, self.timings.get(f"export.{stage}", 0.0), entry.short)
        return entry, hit

    def _cached_validation(self) -> tuple[list[CheckResult], dict] | None:
        if not self.cfg.validate.enabled:
            return None
        with self.cache.locked(self.family.key, "validation", self.validation_key):
            entry = self.cache.lookup(self.family.key, "validation", self.validation_key)
            if entry is None:
                return None
            data = json.loads((entry.path / VALIDATION_FILE).read_text())
        self.validation_short = entry.short
        return [CheckResult(**c) for c in data["checks"]], data.get("variant") or {}

    def _validation(self, contracts, params) -> tuple[list[CheckResult], dict]:
        if not self.cfg.validate.enabled:
            self.status["validation"] = "off"
            return [], {}
        if self.cached_checks is not None:
            self.status["validation"] = "cached"
            log.info("validation: up to date (cache %s, %d checks passed)", self.validation_short, len(self.cached_checks[0]))
            return self.cached_checks
        transformed = any(p != "fp32" for p in self.precision.values())
        t = time.perf_counter()
        with self.progress.step("validating against PyTorch"):
            checks, variant = _validate(self.cfg, self.family, self.staging, contracts, params, self.deepstack,
                                        self.take_model, self.source.path, self.scratch if transformed else None, self.hf_config)
        self.timings["validate"] = time.perf_counter() - t
        self.status["validation"] = "built"
        if all(c.passed for c in checks):  # a failure is never cached: the next run checks again
            def fill(tmp: Path) -> dict:
                (tmp / VALIDATION_FILE).write_text(json.dumps(
                    {"checks": [c.to_json() for c in checks], "variant": variant}, indent=2, sort_keys=True) + "\n")
                return {}

            with self.cache.locked(self.family.key, "validation", self.validation_key):
                entry = self.cache.put(self.family.key, "validation", self.validation_key, self.validation_in, fill)
            log.info("validation: %d checks passed in %.1f s (cache %s)", len(checks), self.timings["validate"], entry.short)
        return checks, variant


def stage_options(stage: str, options: StageOptions) -> StageOptions:
    """The options an export sees: only those its cache key holds (cache.STAGE_READS); the others are None,
    so a stage that starts reading one fails loudly instead of reusing a graph built for another value."""
    return StageOptions(**{k: (v if k in STAGE_READS[stage] else None) for k, v in dataclasses.asdict(options).items()})


def load_hf_config(source, trust_remote_code: bool = False):
    """The transformers config object of the checkpoint, without its weights (contracts, dims, runtime files)."""
    import transformers

    cls = getattr(transformers, source.family.hf_class).config_class
    try:
        return cls.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers validates configs with many error types (strict dataclasses, ...)
        raise CheckpointError(
            f"transformers could not read config.json: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}",
            where=str(source.path / "config.json"),
            fix="check the folder is a complete Hugging Face checkpoint of this family",
        ) from exc


def _validate(cfg, family, staging, contracts, params, deepstack, load_model, source_path, fp32_dir, hf_config):
    """`load_model()` hands over the PyTorch model; the suite frees it after its reference pass."""
    from vlmforge.validators.suite import SuiteInputs, run_suite

    precisions = {s: getattr(cfg.precision, s) for s in STAGES}
    dropped = cfg.model.deepstack == "drop" and family.deepstack_layers(hf_config) > 0
    inp = SuiteInputs(family.key, staging, contracts, precisions, params, deepstack, tuple(cfg.target.providers),
                      deepstack_off=family.deepstack_off if dropped else None, fp32_directory=fp32_dir)
    result = run_suite(inp, load_model, source_path, cfg.validate, validation_images(cfg.validate))
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
    from vlmforge.host.preprocess import load_image

    if vcfg.images:
        return [load_image(p) for p in vcfg.images]
    from vlmforge.fixtures.images import sample_image

    return [sample_image(seed, size=(500, 500)) for seed in vcfg.image_seeds]


def _copy_runtime_files(src: Path, dst: Path) -> None:
    """Tokenizer and processor files into the set, each confined to the checkpoint (checkpoint_file)."""
    for name in RUNTIME_FILES:
        if (src / name).is_file():
            real = checkpoint_file(src, name, f"checkpoint file {name}")
            if real != src.resolve() / name:
                log.info("%s: copied from %s (a link in the checkpoint)", name, real)
            shutil.copyfile(real, dst / name)


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
        "source": {"checkpoint": cfg.model.checkpoint, "revision": cfg.model.revision, "weights": source.weight_files,
                   "config_sha256": source_config_sha256(source.path)},
        "recipe": {k: v for k, v in to_dict(cfg).items() if k not in ("out_dir", "cache_dir", "memory_check")},  # where it ran is not what it is
        "toolchain": toolchain(),
        "components": comps,
        "files": hash_files(staging),
        "token_ids": mc,
        "validation": {"passed": all(c.passed for c in checks) and bool(checks), "checks": [c.to_json() for c in checks]},
    }


def source_config_sha256(path: Path) -> str:
    """sha256 of the checkpoint's config.json: `validate` tells a changed config from changed artifacts."""
    return sha256_file(checkpoint_file(path, "config.json", "checkpoint config.json"))


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


def _publish(staging: Path, final: Path, manifest: dict) -> None:
    """Rename into place, then write the manifest there (atomically): at no moment does a directory without
    its final files carry a manifest. An older set at `final` (check_replaceable) is renamed aside whole
    first: until the new set has its manifest, nothing at `final` verifies."""
    old = None
    check_replaceable(final)
    if os.path.lexists(final):
        old = final.parent / f".{final.name}.old-{owner_tag()}"
        os.rename(final, old)
        (old / MANIFEST).unlink(missing_ok=True)
    os.rename(staging, final)
    write_manifest(final, manifest)
    failed = final.parent / f"{final.name}.failed"
    if (failed / FAILED_MARKER).is_file() and not failed.is_symlink():
        shutil.rmtree(failed, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _park_failed(staging: Path, final: Path, checks: list[CheckResult]) -> Path:
    failed = final.parent / f"{final.name}.failed"
    if os.path.lexists(failed):
        if failed.is_symlink() or not (failed / FAILED_MARKER).is_file():
            raise RecipeError(f"{failed} exists and was not made by vlmforge; the failed build is not kept",
                              where=str(failed), fix="move that folder away to keep the next failed build's report")
        shutil.rmtree(failed)
    (staging / VALIDATION_FILE).write_text(json.dumps([c.to_json() for c in checks], indent=2) + "\n")
    (staging / FAILED_MARKER).write_text("a vlmforge build that failed validation; see validation.json\n")
    os.rename(staging, failed)
    return failed


def _write_build_log(final: Path, timings: dict, cache: dict) -> None:
    """Wall-clock facts go beside the artifact set, never into the manifest (which must be reproducible)."""
    logs = final.parent / LOGS
    make_dir(logs, "the build log folder", "out_dir")
    (logs / f"{final.name}.json").write_text(json.dumps({"seconds": timings, "cache": cache}, indent=2, sort_keys=True) + "\n")
