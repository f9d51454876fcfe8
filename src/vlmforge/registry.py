"""Explicit, loud registries of model families and their stages.

A duplicate registration is an error; an unknown key lists what exists. Families register themselves in
`vlmforge/families/<key>/__init__.py`; `vlmforge.families` imports them and holds the
architecture -> family map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from vlmforge.errors import RecipeError

STAGES = ("vision", "embedding", "decoder")


@dataclass(frozen=True)
class StageSpec:
    """How one stage of one family is described and exported.

    contract(hf_config, options) -> StageContract
    export(hf_model, options, out_path) -> StageContract
    """

    name: str
    contract: Callable[..., Any]
    export: Callable[..., Any]


@dataclass(frozen=True)
class FamilySpec:
    key: str  # HF config.model_type
    display_name: str
    hf_class: str  # transformers class name of the full model
    architectures: tuple[str, ...]
    patch_multiple: int  # valid fixed image sides are multiples of this
    default_sizes: tuple[int, ...]
    check_image_size: Callable[[int, str], None]
    check_checkpoint_config: Callable[[Any, str], None]
    deepstack_layers: Callable[[Any], int]  # hf_config -> number of DeepStack layers (0 = none)
    write_fixture: Callable[..., Any]
    fixture_name: str
    stages: dict[str, StageSpec] = field(default_factory=dict)
    genai_type: str = ""
    # hf_model -> context manager running the HF model without DeepStack (families that have it)
    deepstack_off: Callable[[Any], Any] | None = None

    def stage(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise RecipeError(
                f"family {self.key} has no stage {name!r}",
                where=f"registry of family {self.key}",
                fix=f"use one of {sorted(self.stages)}",
            )
        return self.stages[name]


def lazy(target: str) -> Callable[..., Any]:
    """`"pkg.module:function"` -> a callable importing it on first use (families stay cheap to register)."""
    module_name, _, attr = target.partition(":")

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module_name), attr)(*args, **kwargs)

    call.__name__ = attr
    call.__qualname__ = target
    return call


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    if spec.key in _FAMILIES:
        raise RuntimeError(f"family {spec.key!r} registered twice")
    missing = [s for s in STAGES if s not in spec.stages]
    if missing:
        raise RuntimeError(f"family {spec.key!r} registers no stage(s) {missing}")
    _FAMILIES[spec.key] = spec
    return spec


def families() -> dict[str, FamilySpec]:
    import vlmforge.families  # noqa: F401  (registers the built-in families)

    return dict(_FAMILIES)


def get_family(key: str, where: str = "") -> FamilySpec:
    known = families()
    if key not in known:
        raise RecipeError(
            f"unknown model family {key!r}",
            where=where or "recipe key model.family",
            fix=f"use one of {sorted(known)}",
        )
    return known[key]


def family_for_architecture(arch: str) -> FamilySpec | None:
    for spec in families().values():
        if arch in spec.architectures:
            return spec
    return None
