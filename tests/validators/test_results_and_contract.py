"""Validation results (pass/fail rules, JSON form, the report line), the gate that turns recipe tolerances
into checks, and the contract checker on small hand-made graphs: a wrong input name, dtype or dim, a
graph onnx.checker rejects, and external data that does not hold the bytes the tensor needs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests._onnx_graphs import init, model, save, value
from vlmforge.core.contracts import StageContract, TensorSpec
from vlmforge.validators.contract import check_contract, graph_io
from vlmforge.validators.metrics import gate
from vlmforge.validators.results import CheckResult, at_least, at_most


def test_bounds_pass_at_the_bound_and_nan_never_passes():
    assert at_most("decoder", "x", "max_rel", 1e-4, 1e-4).passed
    assert not at_most("decoder", "x", "max_rel", 1.0001e-4, 1e-4).passed
    assert at_least("decoder", "x", "cosine", 0.999, 0.999).passed
    assert not at_least("decoder", "x", "cosine", 0.998, 0.999).passed
    assert not at_most("decoder", "x", "max_rel", float("nan"), 1.0).passed
    assert not at_least("decoder", "x", "cosine", float("nan"), 0.0).passed
    assert isinstance(at_most("d", "x", "m", np.float32(0.5), 1).value, float)  # numpy scalars become floats


def test_results_serialise_to_json_with_six_significant_digits():
    r = at_most("vision", "features", "max_abs", 1.23456789e-5, 1e-4, "cosine=1")
    d = r.to_json()
    assert d == {"stage": "vision", "name": "features", "metric": "max_abs", "value": 1.23457e-5,
                 "tolerance": 1e-4, "passed": True, "detail": "cosine=1", "kind": "graph"}
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert CheckResult("vision", "io", "mismatches", 2, 0, False).to_json()["value"] == 2  # ints untouched
    assert r.line() == "PASS vision    features                           max_abs = 1.23e-05 (tolerance 0.0001)"
    assert CheckResult("decoder", "io", "mismatches", 1, 0, False).line().startswith("FAIL decoder ")


def test_gate_bounds_errors_from_above_and_agreement_from_below():
    values = {"max_abs": 0.5, "max_rel": 0.01, "cosine": 0.98, "top1": 1.0}
    checks = gate("decoder", "logits", values, {"max_rel": 0.02, "cosine": 0.99})
    assert [(c.metric, c.passed) for c in checks] == [("max_rel", True), ("cosine", False)]
    assert all("max_abs=0.5" in c.detail and "top1=1" in c.detail for c in checks)  # every metric rides along
    assert gate("decoder", "logits", values, {"top1": 1.0, "nonexistent": 1})[0].passed
    with pytest.raises(KeyError, match="names none of the metrics"):
        gate("decoder", "logits", values, {"top5": 0.9})


# -- the contract checker ---------------------------------------------------------------------------
CONTRACT = StageContract(
    "embedding",
    (TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),),
    (TensorSpec("inputs_embeds", "float32", ("batch_size", "sequence_length", 4)),),
)


def _embedding_graph(input_name: str = "input_ids", dims=("batch_size", "sequence_length"),
                     dtype=TensorProto.INT64, hidden: int = 4) -> onnx.ModelProto:
    table = np.arange(10 * hidden, dtype=np.float32).reshape(10, hidden)
    return model([helper.make_node("Gather", ["table", input_name], ["inputs_embeds"], axis=0)],
                 [value(input_name, dims, dtype)], [value("inputs_embeds", ["batch_size", "sequence_length", hidden])],
                 [init("table", table)])


def _by_name(checks):
    return {c.name: c for c in checks}


def test_a_graph_that_matches_its_contract_passes(tmp_path):
    path = save(_embedding_graph(), tmp_path / "embedding.onnx")
    checks = _by_name(check_contract(path, CONTRACT))
    assert checks["onnx.checker"].passed and checks["io matches contract"].passed
    inputs, outputs = graph_io(onnx.load(str(path)))
    assert inputs == [TensorSpec("input_ids", "int64", ("batch_size", "sequence_length"))]  # initializers are not inputs
    assert outputs == [TensorSpec("inputs_embeds", "float32", ("batch_size", "sequence_length", 4))]


@pytest.mark.parametrize("graph, words", [
    (dict(input_name="ids"), "input names ['ids'] != contract ['input_ids']"),
    (dict(dtype=TensorProto.INT32), "input 'input_ids' is int32; contract says int64"),
    (dict(dims=("batch_size", 7)), "input 'input_ids' has shape ['batch_size', 7]; contract says"),
    (dict(hidden=5), "output 'inputs_embeds' has shape ['batch_size', 'sequence_length', 5]; contract says"),
])
def test_a_wrong_name_dtype_or_dim_fails_and_says_which(tmp_path, graph, words):
    path = save(_embedding_graph(**graph), tmp_path / "embedding.onnx")
    checks = _by_name(check_contract(path, CONTRACT))
    io = checks["io matches contract"]
    assert not io.passed and io.value >= 1 and words in io.detail, io.detail
    assert checks["onnx.checker"].passed  # a valid graph, just not this contract's


def test_a_graph_onnx_checker_rejects_fails_the_checker_check(tmp_path):
    m = _embedding_graph()
    m.graph.node[0].input[0] = "table_that_does_not_exist"
    path = tmp_path / "embedding.onnx"
    onnx.save_model(m, str(path))
    checker = _by_name(check_contract(path, CONTRACT))["onnx.checker"]
    assert not checker.passed and checker.value == 1 and "table_that_does_not_exist" in checker.detail


def test_external_data_that_is_short_fails_the_checker_check(tmp_path):
    path = save(_embedding_graph(), tmp_path / "embedding.onnx", external=True)
    data = tmp_path / "embedding.onnx.data"
    assert _by_name(check_contract(path, CONTRACT))["onnx.checker"].passed
    data.write_bytes(data.read_bytes()[:-8])
    checker = _by_name(check_contract(path, CONTRACT))["onnx.checker"]
    assert not checker.passed and "'table'" in checker.detail, checker.detail
