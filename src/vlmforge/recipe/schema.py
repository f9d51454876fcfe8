"""The dataclass schema (vlmforge.config) as Hydra's structured config, and a composed recipe -> BuildConfig.

`register_schema` makes `BuildConfig` the base of recipes/build.yaml (its defaults list names `build_schema`), so
every schema key can be overridden on the command line and an unknown key fails at composition.
`from_omegaconf` merges a composed recipe onto the schema: unknown keys, values of the wrong type and unset
keys are errors naming the key and the valid ones. Nothing outside `vlmforge.recipe` sees OmegaConf.
"""

from __future__ import annotations

from typing import Any

from vlmforge.config import BuildConfig, check, valid_keys
from vlmforge.core.errors import RecipeError


def register_schema() -> None:
    """Make the dataclass schema the base of recipes/build.yaml (its defaults list names `build_schema`),
    so every schema key can be overridden on the command line and unknown keys fail at composition."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="build_schema", node=BuildConfig)


def _schema_error(exc: Exception, recipe: str) -> RecipeError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    parent = key.rsplit(".", 1)[0] if "." in str(key) else ""
    valid = valid_keys(parent)
    msg = str(exc).splitlines()[0]
    return RecipeError(
        f"recipe key {key!r} is not valid: {msg}",
        where=recipe,
        fix=f"valid keys{' under ' + parent if parent else ''}: {valid}" if valid else "check the key's type",
    )


def from_omegaconf(cfg: Any, recipe: str = "recipes/build.yaml") -> BuildConfig:
    """Merge the composed recipe onto the schema (unknown keys and wrong types fail) -> BuildConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        schema = OmegaConf.structured(BuildConfig)
        # Plain container first: Hydra's `+key=value` lifts struct mode, and a typed node would then carry an
        # unknown key through the merge silently.
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
        merged = OmegaConf.merge(schema, plain)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise RecipeError(
                f"recipe leaves {missing} unset",
                where=recipe,
                fix="choose a model recipe (model=<name>) or set the keys on the command line",
            )
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _schema_error(exc, recipe) from exc
    check(obj, recipe)
    return obj
