"""Recipes -> BuildConfig: find the recipes folder, compose recipes/build.yaml with Hydra overrides."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vlmforge.config import unknown_key_error
from vlmforge.core.errors import RecipeError
from vlmforge.recipe.schema import from_omegaconf, register_schema


def recipes_dir(explicit: str | None = None) -> Path:
    """--recipes, else ./recipes, else the recipes folder of the source tree this package runs from."""
    for cand in (explicit, os.environ.get("VLMFORGE_RECIPES"), "recipes", Path(__file__).resolve().parents[3] / "recipes"):
        if cand and (Path(cand) / "build.yaml").is_file():
            return Path(cand).resolve()
    raise RecipeError("no recipes folder with build.yaml found", where=os.getcwd(),
                      fix="run from the vlmforge checkout or pass --recipes /path/to/recipes")


def compose(overrides: list[str], recipes: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

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


def compose_hydra(recipes: Path, overrides: list[str]):
    """The composed recipe with its `hydra` node (sweeper params, launcher), as a multirun would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(recipes), version_base=None):
            return hydra_compose(config_name="build", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise RecipeError(f"matrix recipe does not compose: {' '.join(str(exc).split())[:600]}",
                          where=f"{recipes}/build.yaml with overrides {overrides}",
                          fix=f"check the overrides; cells live in {recipes}/matrix/cell/, launchers in "
                              f"{recipes}/hydra/launcher/ (or come from an installed Hydra launcher plugin)") from exc
