"""run_build(BuildConfig) -> BuildReport: check the recipe against the family and the target, plan the build
(vlmforge.build.plan), run its nodes into a staging folder (vlmforge.build.execute), publish by rename with
the manifest last (vlmforge.build.publish_dir)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.build.cache import StageCache
from vlmforge.build.execute import Executor
from vlmforge.build.nodes import checks_of
from vlmforge.build.plan import open_build, plan
from vlmforge.build.publish_dir import artifact_dir, check_replaceable, prepare, publish, write_build_log
from vlmforge.config import BuildConfig, resolve_image_size
from vlmforge.core.errors import RecipeError, VlmforgeError, as_os_error, from_os_error
from vlmforge.progress import QUIET, Progress
from vlmforge.registry import STAGES, get_family
from vlmforge.source import open_source, prefetch_weight_hashes
from vlmforge.transforms import TRANSFORMS
from vlmforge.validators.results import CheckResult


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


def run_build(cfg: BuildConfig, recipe: str = "recipes/build.yaml", force: bool = False,
              progress: Progress | None = None) -> BuildReport:
    """Build one artifact set. `force` ignores (and replaces) every cache entry; `progress` draws the live
    status line (default: none, log lines only)."""
    t0 = time.perf_counter()
    prefetch_weight_hashes(cfg.model.checkpoint)  # beside the imports _open makes (source.py)
    b, nodes = _open(cfg, recipe, progress or QUIET, check=True)
    executor = Executor(b, nodes, StageCache(Path(cfg.cache_dir), force))
    b.timings["load"] = time.perf_counter() - t0
    _check_plan(b, executor, recipe)
    _execute(executor)
    checks, _ = checks_of(b)
    report = BuildReport(b.final, True, checks, b.timings, executor.status(), b.model_loaded)
    report.seconds["total"] = time.perf_counter() - t0
    write_build_log(report.directory, report.seconds, report.cache)
    return report


def cache_keys(cfg: BuildConfig, recipe: str = "recipes/build.yaml") -> dict:
    """The cache keys a build of `cfg` uses, computed without a model and without writing anything:
    {"export": {stage: key of its FP32 export}, "final": {stage: key}, "validation": key (None when validation is
    off)}. A stage exported straight to its precision (build.plan.FUSED_STAGES) has no FP32 export key."""
    b, nodes = _open(cfg, recipe, QUIET, check=False)
    keys = Executor(b, nodes, StageCache(Path(cfg.cache_dir))).keys
    final = {s: keys[f"export.{s}"] if p == "fp32" else keys[f"transform.{s}.{p}"] for s, p in b.precision.items()}
    exports = {s: keys[f"export.{s}"] for s in STAGES if f"export.{s}" in keys}
    return {"export": exports, "final": final, "validation": keys.get("validation")}


def _check_plan(b, executor: Executor, recipe: str) -> None:
    """The plan before the work: parameters, bytes, predicted peak memory and disk, logged; refused early
    (ResourceError) when this machine cannot hold the build (vlmforge.launch.plan)."""
    from vlmforge.launch.plan import check_plan, make_plan

    missing = executor.missing()
    needs_model = any(n.startswith("export.") or n == "validation" for n in missing)
    plan_ = make_plan(b.parameters, b.precision, b.cfg.validate.enabled, needs_model, b.bytes_needed(), b.final.parent,
                      b.reference, b.stage_parameters)
    check_plan(plan_, f"{recipe}: model.checkpoint={b.cfg.model.checkpoint}", b.cfg.memory_check)


def _open(cfg: BuildConfig, recipe: str, progress: Progress, check: bool):
    """(Build, nodes): everything that can be checked without writing is checked first, so a bad input
    leaves no directory."""
    family = get_family(cfg.model.family, where=f"{recipe}: model.family")
    image_size = resolve_image_size(cfg.vision.size, family, f"{recipe}: vision.size")
    if check:
        check_target(cfg, recipe)
        if cfg.model.deepstack == "drop" and family.deepstack_off is None:
            raise RecipeError(f"model.deepstack=drop: {family.display_name} has no DeepStack", where=recipe,
                              fix="leave model.deepstack=keep (drop applies to Qwen3-VL)")
    final = artifact_dir(cfg, image_size, recipe)
    if check:
        check_replaceable(final)
    source = open_source(cfg.model.checkpoint, family.key, cfg.model.revision, Path(cfg.cache_dir),
                         f"{recipe}: model.checkpoint")
    b = open_build(cfg, family, source, final, image_size, progress)
    return b, plan(b)


def _execute(executor: Executor) -> None:
    """Run the plan in a fresh staging folder and publish it; on any failure remove the staging folder (a
    parked failed set is already gone from it) and say what an OS error needed."""
    b = executor.build
    prepare(b.final, b.staging, b.scratch)
    try:
        records = executor.run()
        publish(b.staging, b.final, records["manifest"])
    except BaseException as exc:
        if b.staging.exists():
            shutil.rmtree(b.staging, ignore_errors=True)
        oserr = as_os_error(exc) if isinstance(exc, Exception) and not isinstance(exc, VlmforgeError) else None
        if oserr is not None:  # disk full, read-only, ...: say where and how much, not a traceback
            raise from_os_error(oserr, "building the artifact set", where=oserr.filename or str(b.final.parent),
                                needed=b.bytes_needed()) from None
        raise
    finally:
        shutil.rmtree(b.scratch, ignore_errors=True)


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
    for precision in dict.fromkeys(getattr(cfg.precision, s) for s in STAGES):
        row = TRANSFORMS.get(precision)
        check = row.resolve_check() if row is not None else None
        if check is not None:
            params = {kw: getattr(cfg.precision, key) for kw, key in row.params.items()}
            check(**params, where=f"{recipe}: " + ", ".join(f"precision.{k}" for k in row.params.values()))
