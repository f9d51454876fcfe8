"""Every registered family has every stage, a fixture, and recipes; the registry is loud at load time."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import yaml

from tests.conftest import RECIPES
from vlmforge.core.errors import RecipeError
from vlmforge.families import FAMILY_MODULES
from vlmforge.registry import STAGES, RegistryError, StageSpec, families, get_family, load_families


def test_every_family_has_all_stages_a_fixture_and_recipes():
    fams = families()
    assert [key for key, _ in FAMILY_MODULES] == list(fams)
    recipes = [yaml.safe_load(p.read_text()) for p in (RECIPES / "model").glob("*.yaml")]
    for key, fam in fams.items():
        assert set(STAGES) <= set(fam.stages), key
        mine = [r for r in recipes if r.get("family") == key]
        assert any(r["checkpoint"] == f"fixture:{key}" for r in mine), f"{key} has no fixture recipe"
        assert any(not r["checkpoint"].startswith("fixture:") for r in mine), f"{key} has no real-model recipe"


def test_unknown_family_lists_known_ones():
    with pytest.raises(RecipeError) as e:
        get_family("llava")
    assert "qwen2_5_vl" in e.value.fix


@pytest.fixture
def fake_module(monkeypatch):
    """put(name, FAMILY) -> a module `name` importable by the registry (a real module in sys.modules)."""
    def put(name, family):
        module = types.ModuleType(name)
        module.FAMILY = family
        monkeypatch.setitem(sys.modules, name, module)
        return name
    return put


def test_a_family_listed_twice_is_refused():
    with pytest.raises(RegistryError, match="listed twice"):
        load_families([*FAMILY_MODULES, FAMILY_MODULES[0]])


def test_an_architecture_claimed_by_two_families_is_refused(fake_module):
    twin = dataclasses.replace(get_family("qwen2_5_vl"), key="twin")
    with pytest.raises(RegistryError, match="claimed by 'qwen2_5_vl' and 'twin'"):
        load_families([*FAMILY_MODULES, ("twin", fake_module("fake_twin", twin))])


def test_a_row_whose_module_names_another_key_is_refused(fake_module):
    with pytest.raises(RegistryError, match="FAMILY.key is 'qwen2_5_vl'"):
        load_families([("other", fake_module("fake_other", get_family("qwen2_5_vl")))])


def test_a_family_without_all_stages_is_refused(fake_module):
    fam = get_family("qwen2_5_vl")
    partial = dataclasses.replace(fam, key="partial", architectures=("P",), stages={"vision": fam.stages["vision"]})
    with pytest.raises(RegistryError, match=r"no stage\(s\) \['embedding', 'decoder'\]"):
        load_families([("partial", fake_module("fake_partial", partial))])


def test_a_hook_with_the_wrong_signature_fails_at_load_not_at_first_call(fake_module):
    fam = get_family("qwen2_5_vl")
    bad_stage = StageSpec("decoder", fam.stages["decoder"].contract, lambda hf_model, out_path: None)
    bad = dataclasses.replace(fam, key="bad", architectures=("B",), stages={**fam.stages, "decoder": bad_stage})
    with pytest.raises(RegistryError, match=r"stages\['decoder'\].export .* cannot take 3 arguments"):
        load_families([("bad", fake_module("fake_bad", bad))])
    not_a_function = dataclasses.replace(fam, key="bad", architectures=("B",), reference_vision="vision:reference")
    with pytest.raises(RegistryError, match="reference_vision is 'vision:reference', not a function"):
        load_families([("bad", fake_module("fake_bad2", not_a_function))])


def test_a_module_that_does_not_import_is_named():
    with pytest.raises(RegistryError, match="vlmforge.families.no_such_family does not import"):
        load_families([("no_such_family", "vlmforge.families.no_such_family")])


def test_families_never_import_the_registry():
    from pathlib import Path

    from vlmforge.core.modgraph import read_graph

    graph = read_graph(Path(sys.modules["vlmforge"].__file__).parent, "vlmforge")
    for module, imports in graph.all_imports.items():
        if module.startswith("vlmforge.families"):
            assert "vlmforge.registry" not in imports, module
