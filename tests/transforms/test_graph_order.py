"""transforms.graph.topological_sort: the level-by-level order (every node once its inputs exist, each level in the
original order), checked against that definition run pass by pass, on shuffled random graphs; and its refusals."""

from __future__ import annotations

import random

import onnx
import pytest
from onnx import TensorProto, helper

from vlmforge.transforms.graph import topological_sort


def _by_passes(nodes, available):
    """The definition: repeat a pass over the pending nodes, taking (in order) each whose inputs all exist."""
    available, pending, ordered = set(available), list(nodes), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        assert ready
        pending = [n for n in pending if n not in ready]
        ordered += ready
        for n in ready:
            available.update(n.output)
    return [n.name for n in ordered]


def _random_graph(seed: int, size: int = 300):
    rng = random.Random(seed)
    names, nodes = ["x", "w"], []
    for k in range(size):
        inputs = rng.sample(names, min(len(names), rng.choice((1, 2, 3))))
        if rng.random() < 0.1:
            inputs.append("")  # an omitted optional input
        outs = [f"t{k}"] + ([f"t{k}b"] if rng.random() < 0.2 else [])
        nodes.append(helper.make_node("Sum" if len(outs) == 1 else "Split", inputs, outs, name=f"n{k}"))
        names += outs
    rng.shuffle(nodes)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(f"t{size - 1}", TensorProto.FLOAT, [1])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])])
    return helper.make_model(graph)


@pytest.mark.parametrize("seed", range(5))
def test_order_is_the_level_by_level_order(seed):
    model = _random_graph(seed)
    want = _by_passes(model.graph.node, {"x", "w", ""})
    topological_sort(model)
    assert [n.name for n in model.graph.node] == want
    seen = {"x", "w", ""}
    for n in model.graph.node:  # and it is an order in which every input exists before use
        assert all(i in seen for i in n.input), n.name
        seen.update(n.output)


def test_cycles_and_dangling_inputs_are_refused_naming_a_node():
    cyc = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second")],
        "g", [], []))
    with pytest.raises(ValueError, match="cycle or a dangling input near node first"):
        topological_sort(cyc)
    dangling = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="ok"), helper.make_node("Add", ["a", "nowhere"], ["b"], name="bad"),
         helper.make_node("Relu", ["b"], ["c"], name="after")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], []))
    with pytest.raises(ValueError, match="near node bad"):
        topological_sort(dangling)
    assert isinstance(cyc, onnx.ModelProto)
