"""Composition root: argument parsing and Hydra live here only; everything below takes plain arguments."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.core.errors import RecipeError, VlmforgeError, from_os_error

log = logging.getLogger("vlmforge")


def recipes_dir(explicit: str | None = None) -> Path:
    """--recipes, else ./recipes, else the recipes folder of the source tree this package runs from."""
    for cand in (explicit, os.environ.get("VLMFORGE_RECIPES"), "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if cand and (Path(cand) / "build.yaml").is_file():
            return Path(cand).resolve()
    raise RecipeError("no recipes folder with build.yaml found", where=os.getcwd(),
                      fix="run from the vlmforge checkout or pass --recipes /path/to/recipes")


def compose(overrides: list[str], recipes: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vlmforge.config import from_omegaconf, register_schema, unknown_key_error

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(recipes), version_base=None):
            cfg = hydra_compose(config_name="build", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # Hydra raises ValueError for some overrides
        where = f"{recipes}/build.yaml with overrides {list(overrides)}"
        missing = re.search(r"Could not override '([^']+)'", str(exc))
        if missing:
            raise unknown_key_error(missing.group(1), where) from None
        cause = exc.__cause__
        key = getattr(cause, "full_key", None)
        if key and isinstance(cause, OmegaConfBaseException):  # a value of the wrong type for a schema key
            raise RecipeError(f"recipe key {key!r}: {str(cause).splitlines()[0]}", where=where,
                              fix=f"give {key} a value of its type (see vlmforge.config.BuildConfig and "
                                  f"{recipes}/build.yaml)") from None
        raise RecipeError(
            f"recipe does not compose: {' '.join(str(exc).split())[:600]}",
            where=f"{recipes}/build.yaml with overrides {list(overrides)}",
            fix=f"check the override names; config groups live in {recipes}/<group>/<option>.yaml",
        ) from exc
    return from_omegaconf(cfg, recipe=f"{recipes}/build.yaml {' '.join(overrides)}".strip())


def _print_checks(checks) -> None:
    for c in checks:
        print("  " + c.line())


def cmd_export(args) -> int:
    from vlmforge.build import run_build
    from vlmforge.progress import Progress

    cfg = compose(args.overrides, recipes_dir(args.recipes))
    report = run_build(cfg, force=args.force, progress=Progress())
    _print_checks(report.checks)
    print(f"built {report.directory} ({len(report.checks)} checks passed, {report.seconds['total']:.1f} s; "
          f"cache: {report.cache_summary()})")
    return 0


def cmd_export_all(args) -> int:
    recipes = recipes_dir(args.recipes)
    plan = plan_matrix(recipes, args.matrix, list(args.overrides))
    from vlmforge.launch.preflight import check_plan_cache, check_plan_launch

    check_plan_cache(plan)  # before any cell starts: locks work where the cells share the stage cache
    _prepare_checkpoints(plan)
    check_plan_launch(plan)  # the engine answers and every cell fits one of its nodes
    _launch(plan, recipes, force=args.force)
    rows = [_result(c) for c in plan.cells]
    print(matrix_table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} cells failed; their logs: " + ", ".join(r["log"] for r in failed),
              file=sys.stderr)
    return 1 if failed else 0


# -- the matrix: one Hydra multirun ---------------------------------------------------------------------------------
# `export-all` = Hydra's --multirun over recipes/build.yaml + recipes/matrix/<name>.yaml, whose
# `hydra.sweeper.params` lists the cells (options of recipes/matrix/cell/). The launcher is the recipe's
# `hydra/launcher` (basic: in-process; joblib; recipes/hydra/launcher/slurm.yaml; ray_cluster.yaml). Before
# anything runs, this process expands the sweep the way Hydra's basic sweeper does, composes every cell and
# refuses two cells writing one directory. Each job writes its own log and a result file; this process reads
# the results back (every launcher, local or remote, shares the filesystem with it) and prints one table.

CELL_GROUP = "matrix/cell"


@dataclass(frozen=True)
class Cell:
    name: str
    overrides: tuple[str, ...]  # this job's sweep choices (and the user's overrides)
    directory: str  # the artifact set it writes
    log: str
    result: str
    checkpoint: str
    cache_dir: str
    validate: bool = True  # what the cell's memory estimate depends on (vlmforge.launch.resources)
    target: str = "cpu"


@dataclass(frozen=True)
class MatrixPlan:
    matrix: str
    hydra_args: tuple[str, ...]  # what Hydra's own command line would be: +matrix=<name> + the user's overrides
    sweep_keys: tuple[str, ...]
    cells: tuple[Cell, ...]
    in_process: bool  # the basic launcher: jobs run in this process, one after the other
    launcher_target: str = ""
    launcher: dict = field(default_factory=dict)  # the resolved hydra.launcher node (engine preflight checks)
    launcher_where: str = ""


def plan_matrix(recipes: Path, matrix: str, overrides: list[str]) -> MatrixPlan:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from vlmforge.build import artifact_dir
    from vlmforge.config import resolve_image_size
    from vlmforge.registry import get_family

    matrix_file = recipes / "matrix" / f"{matrix}.yaml"
    if not matrix_file.is_file():
        raise RecipeError(f"no matrix {matrix!r}", where=str(matrix_file),
                          fix=f"use one of {sorted(p.stem for p in (recipes / 'matrix').glob('*.yaml'))}")
    hydra_args = (f"+matrix={matrix}", *overrides)
    parser = OverridesParser.create()
    try:
        user = parser.parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise RecipeError(f"override does not parse: {exc}", where=f"overrides {overrides}",
                          fix="write overrides as key=value, group=option, or key=a,b,c to sweep") from exc
    fixed = [o.input_line for o in user if not o.is_sweep_override()]
    hcfg = _compose_hydra(recipes, [f"+matrix={matrix}", *fixed])  # the sweep itself is expanded below
    params = {str(k): str(v) for k, v in (hcfg.hydra.sweeper.params or {}).items()}
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + user
    choices: dict[str, list[str]] = {}  # later overrides of a key replace earlier ones, as in BasicSweeper
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise RecipeError(f"{key}: only lists of values (a,b,c) can be swept here", where=str(matrix_file),
                              fix="list the values explicitly")
        choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else \
            [f"{key}={o.get_value_element_as_str()}"]
    swept = set(params) | {o.get_key_element() for o in parsed if o.is_sweep_override()}
    sweep_keys = tuple(sorted({k.lstrip("+~") for k in swept}))
    launcher = str(hcfg.hydra.launcher.get("_target_", ""))
    from vlmforge.launch.preflight import check_installed

    check_installed(launcher, matrix_file)
    cells, seen = [], {}
    for job in itertools.product(*choices.values()):
        name = cell_name(job, sweep_keys)
        cfg = compose(list(hydra_args[:1]) + list(job), recipes)
        family = get_family(cfg.model.family, where=f"cell {name}: model.family")
        final = artifact_dir(cfg, resolve_image_size(cfg.vision.size, family, f"cell {name}: vision.size"))
        if str(final) in seen:
            raise RecipeError(f"cells {seen[str(final)]!r} and {name!r} would both write {final}",
                              where=f"{matrix_file} (hydra.sweeper.params) with overrides {overrides}",
                              fix="give one of the cells another precision, vision size or name=..., or drop one")
        seen[str(final)] = name
        logs = Path(cfg.out_dir) / "logs"
        cells.append(Cell(name, tuple(job), str(final), str(logs / f"{_file_name(name)}.log"),
                          str(logs / f"{_file_name(name)}.result.json"), cfg.model.checkpoint, cfg.cache_dir,
                          cfg.validate.enabled, cfg.target.name))
    if not cells:
        raise RecipeError(f"matrix {matrix!r} has no cells", where=str(matrix_file),
                          fix=f"list cells under hydra.sweeper.params: +{CELL_GROUP}: a,b,c")
    return MatrixPlan(matrix, hydra_args, sweep_keys, tuple(cells), launcher.endswith(".BasicLauncher"), launcher,
                      _launcher_node(hcfg), f"hydra/launcher of {matrix_file} with overrides {overrides}")


def _launcher_node(hcfg) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(hcfg.hydra.launcher, resolve=True)
    except OmegaConfBaseException:  # an interpolation only a job can resolve: the engine checks read plain keys
        return OmegaConf.to_container(hcfg.hydra.launcher, resolve=False)


def _compose_hydra(recipes: Path, overrides: list[str]):
    """The composed recipe with its `hydra` node (sweeper params, launcher), as a multirun would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vlmforge.config import register_schema

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(recipes), version_base=None):
            return hydra_compose(config_name="build", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise RecipeError(f"matrix recipe does not compose: {' '.join(str(exc).split())[:600]}",
                          where=f"{recipes}/build.yaml with overrides {overrides}",
                          fix=f"check the overrides; cells live in {recipes}/matrix/cell/, launchers in "
                              f"{recipes}/hydra/launcher/ (or come from an installed Hydra launcher plugin)") from exc


def cell_name(job_overrides, sweep_keys: tuple[str, ...]) -> str:
    """The cell's option of matrix/cell, then `key=value` for any other swept key."""
    parts = []
    for o in job_overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key == CELL_GROUP:
            parts.insert(0, value)
        elif key in sweep_keys:
            parts.append(f"{key}={value}")
    return ",".join(parts) or "default"


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def _prepare_checkpoints(plan: MatrixPlan) -> None:
    """Write each embedded fixture once, here, before parallel jobs would race to write the same folder."""
    from vlmforge.source import FIXTURE_PREFIX, resolve_checkpoint

    for ckpt, cache in sorted({(c.checkpoint, c.cache_dir) for c in plan.cells}):
        if ckpt.startswith(FIXTURE_PREFIX):
            resolve_checkpoint(ckpt, None, Path(cache), "matrix cell model.checkpoint")


def _launch(plan: MatrixPlan, recipes: Path, force: bool) -> None:
    import hydra

    from vlmforge.launch.watch import mark_queued

    for c in plan.cells:
        mark_queued(c.result)  # a result (or start) left by an earlier run never counts for this one
    job = MatrixJob(plan.sweep_keys, {c.name: (c.log, c.result) for c in plan.cells}, force, plan.in_process)
    main = hydra.main(config_path=str(recipes), config_name="build", version_base=None)(job)
    argv = sys.argv
    sys.argv = ["vlmforge export-all", "--multirun", *plan.hydra_args]
    try:
        main()  # Hydra's own entry point: it reads sys.argv
    except SystemExit as exc:  # Hydra reports a launcher failure and exits; the table still says what ran
        if exc.code not in (0, None):
            log.error("the launcher stopped (exit %s); cells without a result are reported as failed", exc.code)
    finally:
        sys.argv = argv


@dataclass(frozen=True)
class MatrixJob:
    """Hydra's task function for one cell (picklable, so joblib/submitit/ray can ship it to a worker).
    A cell's failure is recorded, never raised: the other cells go on."""

    sweep_keys: tuple[str, ...]
    files: dict  # cell name -> (log file, result file)
    force: bool = False
    in_process: bool = True

    def cell(self, job_overrides) -> tuple[str, str, str]:
        """(cell name, log file, result file) of the job with these overrides: launchers report through them."""
        name = cell_name(job_overrides, self.sweep_keys)
        return (name, *self.files[name])

    def __call__(self, cfg) -> dict:
        from hydra.core.hydra_config import HydraConfig

        from vlmforge.build import run_build
        from vlmforge.config import from_omegaconf
        from vlmforge.progress import Progress

        from vlmforge.launch.watch import mark_started

        name, log_file, result_file = self.cell(HydraConfig.get().overrides.task)
        mark_started(result_file, name)
        handlers = _cell_logging(name, Path(log_file), self.in_process)
        _reset_peak_rss()
        t0 = time.perf_counter()
        result = {"cell": name, "status": "FAILED", "log": log_file, "pid": os.getpid(), "started": time.time()}
        try:
            build_cfg = from_omegaconf(cfg, recipe=f"recipes/build.yaml +{CELL_GROUP}={name}")
            report = run_build(build_cfg, recipe=f"cell {name}", force=self.force,
                               progress=Progress(enabled=None if self.in_process else False))
            result.update(status="ok", directory=str(report.directory), cache=report.cache_summary(),
                          checks=len(report.checks))
        except VlmforgeError as err:
            log.error("cell %s failed:\n%s", name, err.render())
            result.update(error=f"{err.kind}: {err.what}")
        except Exception as err:  # a bug met by one cell must not stop the others; its traceback is in its log
            handlers[0].handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "cell %s crashed", (name,),
                                              sys.exc_info()))  # the traceback goes to the cell's log file only
            log.error("cell %s crashed (%s: %s); the traceback is in %s", name, type(err).__name__,
                      str(err).splitlines()[0][:200] if str(err) else "", log_file)
            result.update(status="CRASHED", error=f"{type(err).__name__}: {err}")
        finally:
            result.update(seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=_peak_rss_mb(), ended=time.time())
            Path(result_file).parent.mkdir(parents=True, exist_ok=True)
            Path(result_file).write_text(json.dumps(result, indent=2) + "\n")
            for h in handlers:
                logging.getLogger().removeHandler(h)
                h.close()
        return result


def _cell_logging(name: str, log_file: Path, in_process: bool) -> list[logging.Handler]:
    """The cell's log file; in a fresh worker process (no handlers yet) also stderr, prefixed by the cell."""
    root = logging.getLogger()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(log_file, mode="w")]
    if not in_process or not root.handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    quiet_noisy_loggers()
    return handlers


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so a cell's peak is its own even in a reused worker."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _result(cell: Cell) -> dict:
    try:
        return json.loads(Path(cell.result).read_text())
    except (OSError, json.JSONDecodeError):
        return {"cell": cell.name, "status": "NO RESULT", "log": cell.log,
                "error": "the job ended without writing its result (killed, or the launcher failed)"}


def matrix_table(rows: list[dict]) -> str:
    head = ("cell", "status", "seconds", "peak RSS MB", "cache hits", "result")
    body = [(r["cell"], r["status"], f"{r['seconds']:.1f}" if "seconds" in r else "-",
             f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-", r.get("cache", "-"),
             r.get("directory") or r.get("error", "")[:100]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def cmd_verify(args) -> int:
    from vlmforge.artifact.manifest import verify_dir
    from vlmforge.release.commands import cmd_verify_release
    from vlmforge.release.verify import is_release

    if is_release(Path(args.directory)):  # a release folder (SHA256SUMS) or tarball from `vlmforge publish`
        return cmd_verify_release(Path(args.directory))
    report = verify_dir(Path(args.directory))
    for line in report.lines():
        print(line)
    print(f"{args.directory}: {'OK' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1


def cmd_validate(args) -> int:
    from vlmforge.revalidate import revalidate

    checks = revalidate(Path(args.directory), checkpoint=args.checkpoint)
    _print_checks(checks)
    ok = all(c.passed for c in checks)
    print(f"{args.directory}: {len(checks)} checks, {'all passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_fixture(args) -> int:
    """A tiny fixture of a family (`qwen2_5_vl`), or a random-weight checkpoint at a public config
    (`qwen2_5_vl_3b`, streamed in bf16 shards; --layers / --vision-layers reduce its depth)."""
    from vlmforge.fixtures.checkpoint import check_new_folder
    from vlmforge.fixtures.public import public_configs, write_public_fixture
    from vlmforge.registry import families, get_family

    where = "vlmforge fixture NAME OUT"
    if args.family in public_configs():
        out = write_public_fixture(args.family, check_new_folder(Path(args.out), where), layers=args.layers,
                                   vision_layers=args.vision_layers, seed=args.seed,
                                   max_shard_bytes=args.shard_bytes, rope_layout=args.rope_layout)
        print(out)
        return 0
    if args.family not in families():
        raise RecipeError(f"unknown fixture {args.family!r}", where=where,
                          fix=f"use a tiny fixture family {sorted(families())} or a public config {sorted(public_configs())}")
    if args.layers is not None or args.vision_layers is not None:
        raise RecipeError(f"--layers / --vision-layers apply to the public configs, not the tiny {args.family} fixture",
                          where=where, fix=f"drop them, or use one of {sorted(public_configs())}")
    family = get_family(args.family, where=where)
    out = family.write_fixture(check_new_folder(Path(args.out), where))
    print(out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmforge", description="Build, validate, verify and run ONNX artifact sets of vision-language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--recipes", help="recipes folder (default: ./recipes)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="build one artifact set from a recipe (Hydra overrides)")
    e.add_argument("overrides", nargs="*", help="e.g. model=<recipe> model.checkpoint=/models/x vision=large")
    e.add_argument("--force", action="store_true", help="rebuild every stage and re-run validation (ignore the cache)")
    e.set_defaults(func=cmd_export)
    a = sub.add_parser("export-all", help="build every cell of a matrix recipe (one Hydra multirun)")
    a.add_argument("--matrix", default="default", help="recipes/matrix/<name>.yaml (default: default)")
    a.add_argument("--force", action="store_true", help="rebuild every stage of every cell (ignore the cache)")
    a.add_argument("overrides", nargs="*",
                   help="overrides applied to every cell, e.g. validate.chain_tokens=4 hydra/launcher=joblib")
    a.set_defaults(func=cmd_export_all)
    v = sub.add_parser("verify", help="re-hash an artifact directory (or a release folder/tarball) against its manifest")
    v.add_argument("directory")
    v.set_defaults(func=cmd_verify)
    val = sub.add_parser("validate", help="re-run every validation check of an artifact directory")
    val.add_argument("directory")
    val.add_argument("--checkpoint", help="the source checkpoint folder, if it moved since the build "
                                          "(default: the manifest's model.checkpoint)")
    val.set_defaults(func=cmd_validate)
    f = sub.add_parser("fixture", help="write a family's tiny checkpoint, or a random-weight one at a public config "
                                       "(a recipes/model name), as a Hugging Face folder")
    f.add_argument("family", metavar="NAME", help="a family key (tiny fixture) or a public config (recipes/model/)")
    f.add_argument("out")
    f.add_argument("--layers", type=int, help="decoder layers (public configs; default: all)")
    f.add_argument("--vision-layers", type=int, help="ViT blocks (public configs; default: all)")
    f.add_argument("--seed", type=int, default=0, help="weights are a pure function of the seed (default 0)")
    f.add_argument("--shard-bytes", type=int, default=2 * 10**9, help="safetensors shard limit (default 2e9)")
    f.add_argument("--rope-layout", choices=("hub", "transformers5"), default="hub",
                   help="config.json rotary keys: rope_scaling + rope_theta as the hub files (default), "
                        "or transformers 5's rope_parameters")
    f.set_defaults(func=cmd_fixture)
    from vlmforge.release.commands import add_parsers as add_publish_parsers
    from vlmforge.runtime.commands import register

    add_publish_parsers(sub)
    register(sub)
    __import__("vlmforge.artifact.js_commands", fromlist=["register"]).register(sub)
    return p


def quiet_noisy_loggers() -> None:
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per skipped node


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_noisy_loggers()
    try:
        return int(args.func(args) or 0)
    except VlmforgeError as err:
        if args.verbose:
            log.exception("details")
        print(err.render(), file=sys.stderr)
        return 2
    except OSError as exc:  # the machine refused (disk full, read-only, permissions): not a bug, no traceback
        if args.verbose:
            log.exception("details")
        print(from_os_error(exc, f"running `vlmforge {args.command}`").render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
