"""The matrix: one Hydra multirun.

`export-all` = Hydra's --multirun over recipes/build.yaml + recipes/matrix/<name>.yaml, whose
`hydra.sweeper.params` lists the cells (options of recipes/matrix/cell/). The launcher is the recipe's
`hydra/launcher` (basic: in-process; joblib; recipes/hydra/launcher/slurm.yaml; ray.yaml). Before
anything runs, this process expands the sweep the way Hydra's basic sweeper does, composes every cell and
refuses two cells writing one directory. Each job writes its own log and a result file; this process reads
the results back (every launcher, local or remote, shares the filesystem with it).
"""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

from vlmforge.core.errors import RecipeError
from vlmforge.recipe.cells import CELL_GROUP, Cell, MatrixPlan, cell_name, file_name, read_result
from vlmforge.recipe.compose import compose, compose_hydra

log = logging.getLogger("vlmforge")


def export_all(recipes: Path, matrix: str, overrides: list[str], force: bool = False) -> list[dict]:
    """Plan the matrix, check it can run, run every cell through its launcher; one result record per cell."""
    from vlmforge.launch.preflight import check_plan_cache, check_plan_launch

    plan = plan_matrix(recipes, matrix, list(overrides))
    check_plan_cache(plan)  # before any cell starts: locks work where the cells share the stage cache
    prepare_checkpoints(plan)
    check_plan_launch(plan)  # the engine answers and every cell fits one of its nodes
    launch(plan, recipes, force=force)
    return [read_result(c) for c in plan.cells]


def plan_matrix(recipes: Path, matrix: str, overrides: list[str]) -> MatrixPlan:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from vlmforge.launch.preflight import check_installed

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
    hcfg = compose_hydra(recipes, [f"+matrix={matrix}", *fixed])  # the sweep itself is expanded below
    choices, sweep_keys = _sweep(parser, hcfg, user, matrix_file)
    launcher = str(hcfg.hydra.launcher.get("_target_", ""))
    check_installed(launcher, matrix_file)
    cells = _cells(recipes, hydra_args, choices, sweep_keys,
                   where=f"{matrix_file} (hydra.sweeper.params) with overrides {overrides}")
    if not cells:
        raise RecipeError(f"matrix {matrix!r} has no cells", where=str(matrix_file),
                          fix=f"list cells under hydra.sweeper.params: +{CELL_GROUP}: a,b,c")
    return MatrixPlan(matrix, hydra_args, sweep_keys, tuple(cells), launcher.endswith(".BasicLauncher"), launcher,
                      _launcher_node(hcfg), f"hydra/launcher of {matrix_file} with overrides {overrides}")


def _sweep(parser, hcfg, user, matrix_file: Path) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    """(key -> its `key=value` choices, the swept keys): the recipe's sweeper params, then the user's overrides."""
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
    return choices, tuple(sorted({k.lstrip("+~") for k in swept}))


def _cells(recipes: Path, hydra_args, choices, sweep_keys, where: str) -> list[Cell]:
    """Every job of the sweep, composed; two cells writing one artifact directory are refused."""
    from vlmforge.build import artifact_dir
    from vlmforge.config import resolve_image_size
    from vlmforge.registry import get_family

    cells, seen = [], {}
    for job in itertools.product(*choices.values()):
        name = cell_name(job, sweep_keys)
        cfg = compose(list(hydra_args[:1]) + list(job), recipes)
        family = get_family(cfg.model.family, where=f"cell {name}: model.family")
        final = artifact_dir(cfg, resolve_image_size(cfg.vision.size, family, f"cell {name}: vision.size"))
        if str(final) in seen:
            raise RecipeError(f"cells {seen[str(final)]!r} and {name!r} would both write {final}", where=where,
                              fix="give one of the cells another precision, vision size or name=..., or drop one")
        seen[str(final)] = name
        logs = Path(cfg.out_dir) / "logs"
        cells.append(Cell(name, tuple(job), str(final), str(logs / f"{file_name(name)}.log"),
                          str(logs / f"{file_name(name)}.result.json"), cfg.model.checkpoint, cfg.cache_dir,
                          cfg.validate.enabled, cfg.target.name))
    return cells


def _launcher_node(hcfg) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(hcfg.hydra.launcher, resolve=True)
    except OmegaConfBaseException:  # an interpolation only a job can resolve: the engine checks read plain keys
        return OmegaConf.to_container(hcfg.hydra.launcher, resolve=False)


def prepare_checkpoints(plan: MatrixPlan) -> None:
    """Write each embedded fixture once, here, before parallel jobs would race to write the same folder."""
    from vlmforge.source import FIXTURE_PREFIX, resolve_checkpoint

    for ckpt, cache in sorted({(c.checkpoint, c.cache_dir) for c in plan.cells}):
        if ckpt.startswith(FIXTURE_PREFIX):
            resolve_checkpoint(ckpt, None, Path(cache), "matrix cell model.checkpoint")


def launch(plan: MatrixPlan, recipes: Path, force: bool) -> None:
    """Run the plan as Hydra's own multirun (Hydra reads sys.argv); a launcher failure is logged, not raised."""
    import hydra

    from vlmforge.launch.watch import mark_queued
    from vlmforge.recipe.jobs import MatrixJob

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
