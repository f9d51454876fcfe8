"""Recipes: the only place Hydra and OmegaConf are imported inside vlmforge.

* `schema`  — the dataclass schema (vlmforge.config) as Hydra's structured config; a composed recipe -> BuildConfig
* `compose` — find the recipes folder, compose recipes/build.yaml with overrides
* `cells`   — the matrix as data (Cell, MatrixPlan, cell names, the result table)
* `matrix`  — plan the matrix (expand the sweep, compose every cell) and launch it as one Hydra multirun
* `jobs`    — MatrixJob, the task function each cell runs (its log and result record)

Hydra and OmegaConf are imported inside functions, so importing this package costs neither.
"""

from vlmforge.recipe.compose import compose, recipes_dir

__all__ = ["compose", "recipes_dir"]
