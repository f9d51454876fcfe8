"""KVLayout.from_contract is the one KV layout: the build's contracts, the manifest's copy of them and the
exporter's own dims agree, and a decoder contract without a complete flat KV cache is refused by name."""

from __future__ import annotations

import pytest

from vlmforge.core.contracts import KVLayout, StageContract, TensorSpec
from vlmforge.core.errors import ArtifactError, ContractError
from vlmforge.exporters.decoder import decoder_contract


@pytest.fixture(scope="module")
def text_config():
    from vlmforge.families.qwen3_vl.fixture import tiny_config

    return tiny_config().text_config


@pytest.mark.parametrize("deepstack", [0, 2])
def test_layout_matches_the_exporters_own_dims(text_config, deepstack):
    contract = decoder_contract(text_config, deepstack)
    meta = contract.meta
    assert KVLayout.from_contract(contract) == KVLayout(meta["num_layers"], meta["kv_heads"], meta["head_dim"],
                                                        meta.get("deepstack_layers", 0), meta["hidden"])


def test_layout_survives_the_manifest_round_trip(text_config):
    contract = decoder_contract(text_config, 2)
    again = StageContract.from_json("decoder", contract.to_json())
    assert again == contract and KVLayout.from_contract(again) == KVLayout.from_contract(contract)


def test_a_missing_present_output_is_named(text_config):
    contract = decoder_contract(text_config, 0)
    broken = StageContract("decoder", contract.inputs, tuple(t for t in contract.outputs if t.name != "present.1.value"))
    with pytest.raises(ContractError, match=r"lacks \['present.1.value'\]"):
        KVLayout.from_contract(broken)


def test_a_gap_in_the_layers_is_refused_with_the_callers_error_kind():
    kv = (1, 2, "past", 8)
    inputs = (TensorSpec("inputs_embeds", "float32", ("b", "s", 16)), TensorSpec("past_key_values.0.key", "float32", kv),
              TensorSpec("past_key_values.0.value", "float32", kv), TensorSpec("past_key_values.2.key", "float32", kv),
              TensorSpec("past_key_values.2.value", "float32", kv))
    outputs = tuple(TensorSpec(f"present.{i}.{k}", "float32", kv) for i in (0, 2) for k in ("key", "value"))
    with pytest.raises(ArtifactError, match=r"layers \[0, 2\]") as e:
        KVLayout.from_contract(StageContract("decoder", inputs, outputs), where="x/manifest.json", error=ArtifactError)
    assert e.value.where == "x/manifest.json"
