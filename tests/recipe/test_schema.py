"""A recipe as plain data (a manifest's `recipe`) and a composed one give the same BuildConfig, with the same
refusals: unknown keys, wrong types and unset keys name the key; no OmegaConf outside vlmforge.recipe."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import compose
from vlmforge.config import BuildConfig, from_dict, to_dict
from vlmforge.core.errors import RecipeError


def recorded(cfg: BuildConfig) -> dict:
    """What a manifest records (build.py drops where it ran)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("out_dir", "cache_dir")}


@pytest.mark.parametrize("overrides", [(), ("precision=int4_mixed", "vision=large"), ("model=tiny_qwen3_vl",),
                                       ("++validate.tolerances.vision.fp32.max_abs=0.5", "name=x")])
def test_a_recorded_recipe_round_trips_to_the_composed_config(overrides):
    cfg = compose(*overrides)
    back = from_dict(recorded(cfg), recipe="manifest.json recipe")
    assert back == dataclasses.replace(cfg, out_dir=BuildConfig().out_dir, cache_dir=BuildConfig().cache_dir)
    assert isinstance(back.precision.int4, type(cfg.precision.int4))


def test_from_dict_copies_what_it_is_given():
    data = recorded(compose())
    cfg = from_dict(data, recipe="r")
    cfg.validate.image_seeds.append(99)
    assert 99 not in data["validate"]["image_seeds"]


def test_an_unknown_key_names_the_valid_ones():
    data = recorded(compose())
    data["model"]["chekpoint"] = "/x"
    with pytest.raises(RecipeError) as err:
        from_dict(data, recipe="d/manifest.json recipe")
    assert "'model.chekpoint' does not exist" in err.value.what and err.value.where == "d/manifest.json recipe"
    assert "checkpoint" in err.value.fix and "valid keys under model" in err.value.fix


@pytest.mark.parametrize("path, value, says", [(("validate", "chain_tokens"), "4", "'validate.chain_tokens'"),
                                               (("validate", "enabled"), 1, "'validate.enabled'"),
                                               (("validate", "chain_tokens"), True, "'validate.chain_tokens'"),
                                               (("model",), "tiny", "'model' is not a mapping"),
                                               (("name",), 3, "'name'")])
def test_a_value_of_the_wrong_type_is_refused(path, value, says):
    data = recorded(compose())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(RecipeError) as err:
        from_dict(data, recipe="r")
    assert says in err.value.what


def test_unset_keys_and_cross_field_checks_apply():
    with pytest.raises(RecipeError, match=r"leaves \['model.checkpoint', 'model.family', 'model.name'\] unset"):
        from_dict({}, recipe="r")
    data = recorded(compose())
    data["precision"]["decoder"] = "int8"
    with pytest.raises(RecipeError, match="precision.decoder='int8' is not a precision"):
        from_dict(data, recipe="r")
