"""The model families, loaded from the table in `vlmforge.families` and checked, all at once.

Explicit and loud: a family listed twice, a spec whose key differs from its row, an architecture claimed by
two families, a stage missing or a hook that is not a function taking the arguments the build passes is an
error naming the family module and what to fix. Every family is imported and checked together, the first
time anything asks the registry for a family — so before any hook can be called, but not merely because a
module imports this one: family stages import torch, and the runtime and `vlmforge verify` (which import
`vlmforge.source`) must stay torch-free. An unknown key lists what exists. Families never import this module
(they build a `families.spec.FamilySpec`); this module imports them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Iterable

from vlmforge.core.errors import RecipeError
from vlmforge.families import FAMILY_MODULES
from vlmforge.families.spec import STAGES, FamilySpec, StageSpec

__all__ = ["STAGES", "FamilySpec", "RegistryError", "StageSpec", "families", "family_for_architecture",
           "family_module", "get_family", "load_families"]

# Hook name -> how many positional arguments the build passes it.
HOOK_ARITY = {"check_image_size": 2, "check_checkpoint_config": 2, "deepstack_layers": 1, "write_fixture": 1,
              "reference_vision": 3, "deepstack_off": 1,
              "write_bench_checkpoint": 3, "checkpoint_name": 1}
STAGE_ARITY = {"contract": 2, "export": 3}
OPTIONAL_HOOKS = ("deepstack_off", "write_bench_checkpoint", "checkpoint_name")


class RegistryError(RuntimeError):
    """A family table or spec that cannot work: a programming error in vlmforge or a family folder."""

    def __init__(self, what: str, where: str, fix: str) -> None:
        super().__init__(f"{what}\n  where: {where}\n  fix:   {fix}")


def _check_callable(fn, arity: int, what: str, where: str) -> None:
    if not callable(fn):
        raise RegistryError(f"{what} is {fn!r}, not a function", where, "point it at a function of the family")
    try:
        inspect.signature(fn).bind(*range(arity))
    except TypeError as exc:
        raise RegistryError(f"{what} ({getattr(fn, '__qualname__', fn)}) cannot take {arity} arguments: {exc}",
                            where, f"give it the signature the build calls it with ({arity} positional arguments)")
    except ValueError:  # builtins without a signature: callable is all that can be checked
        pass


def check_spec(key: str, spec, where: str) -> FamilySpec:
    """Raise RegistryError unless `spec` is a complete FamilySpec for family `key`."""
    if not isinstance(spec, FamilySpec):
        raise RegistryError(f"FAMILY is {type(spec).__name__}, not a FamilySpec", where,
                            "define FAMILY = FamilySpec(...) in the family's __init__.py")
    if spec.key != key:
        raise RegistryError(f"the table row says {key!r} but FAMILY.key is {spec.key!r}", where,
                            "make the row in vlmforge/families/__init__.py and FAMILY.key agree")
    missing = [s for s in STAGES if s not in spec.stages]
    if missing:
        raise RegistryError(f"family {key!r} has no stage(s) {missing}", where, f"add StageSpecs for {list(STAGES)}")
    for name, arity in HOOK_ARITY.items():
        fn = getattr(spec, name)
        if fn is not None or name not in OPTIONAL_HOOKS:
            _check_callable(fn, arity, f"FAMILY.{name}", where)
    for stage in STAGES:
        for name, arity in STAGE_ARITY.items():
            _check_callable(getattr(spec.stages[stage], name), arity, f"FAMILY.stages[{stage!r}].{name}", where)
    if spec.dynamic_vision is not None:
        for name, arity in STAGE_ARITY.items():
            _check_callable(getattr(spec.dynamic_vision, name), arity, f"FAMILY.dynamic_vision.{name}", where)
    if spec.trained is not None:
        _check_callable(spec.trained.config_dict, 0, "FAMILY.trained.config_dict", where)
        _check_callable(spec.trained.image_processor_config, 0, "FAMILY.trained.image_processor_config", where)
    return spec


def load_families(table: Iterable[tuple[str, str]]) -> dict[str, FamilySpec]:
    """Import every (key, module) row and check it; loud on duplicate keys and duplicate architectures."""
    out: dict[str, FamilySpec] = {}
    owner: dict[str, str] = {}
    for key, module_name in table:
        where = f"vlmforge/families/__init__.py row ({key!r}, {module_name!r})"
        if key in out:
            raise RegistryError(f"family {key!r} is listed twice", where, "keep one row per family")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RegistryError(f"family module {module_name} does not import: {exc}", where,
                                "fix the module path in the row or the import error in the family") from exc
        spec = check_spec(key, getattr(module, "FAMILY", None), f"{module_name}.FAMILY ({where})")
        for arch in spec.architectures:
            if arch in owner:
                raise RegistryError(f"architecture {arch!r} is claimed by {owner[arch]!r} and {key!r}", where,
                                    "each config.json architecture must belong to one family")
            owner[arch] = key
        out[key] = spec
    return out


@functools.lru_cache(maxsize=1)
def _families() -> dict[str, FamilySpec]:
    return load_families(FAMILY_MODULES)


def families() -> dict[str, FamilySpec]:
    return dict(_families())


def get_family(key: str, where: str = "") -> FamilySpec:
    known = _families()
    if key not in known:
        raise RecipeError(
            f"unknown model family {key!r}",
            where=where or "recipe key model.family",
            fix=f"use one of {sorted(known)}",
        )
    return known[key]


def family_module(key: str) -> str:
    """The module whose FAMILY is family `key` (its spec: hashed into the family's cache keys)."""
    get_family(key)
    return dict(FAMILY_MODULES)[key]


def family_for_architecture(arch: str) -> FamilySpec | None:
    for spec in _families().values():
        if arch in spec.architectures:
            return spec
    return None
