"""Every registered family has every stage, a fixture, and recipes; the registry is loud."""

from __future__ import annotations

import pytest
import yaml

from vlmforge.errors import RecipeError
from vlmforge.registry import STAGES, FamilySpec, families, get_family, register_family
from tests.conftest import RECIPES


def test_every_family_has_all_stages_a_fixture_and_recipes():
    fams = families()
    assert {"qwen2_5_vl"} <= set(fams)
    recipes = [yaml.safe_load(p.read_text()) for p in (RECIPES / "model").glob("*.yaml")]
    for key, fam in fams.items():
        assert set(STAGES) <= set(fam.stages), key
        assert callable(fam.write_fixture)
        mine = [r for r in recipes if r.get("family") == key]
        assert any(r["checkpoint"] == f"fixture:{key}" for r in mine), f"{key} has no fixture recipe"
        assert any(not r["checkpoint"].startswith("fixture:") for r in mine), f"{key} has no real-model recipe"


def test_unknown_family_lists_known_ones():
    with pytest.raises(RecipeError) as e:
        get_family("llava")
    assert "qwen2_5_vl" in e.value.fix


def test_duplicate_registration_is_an_error():
    fam = get_family("qwen2_5_vl")
    with pytest.raises(RuntimeError, match="twice"):
        register_family(fam)


def test_family_without_all_stages_is_refused():
    fam = get_family("qwen2_5_vl")
    partial = FamilySpec(**{**fam.__dict__, "key": "partial", "stages": {"vision": fam.stages["vision"]}})
    with pytest.raises(RuntimeError, match="no stage"):
        register_family(partial)
