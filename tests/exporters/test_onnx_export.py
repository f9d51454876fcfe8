"""The export mechanics on small graphs: normalize_model drops only the exporter's debug metadata (so the
bytes no longer depend on where the checkout lives), stamp_contract_dims names I/O dims as the contract
does, save_model's file layout, and export_module refusing a graph whose inputs are not the contract's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from tests._onnx_graphs import init, model, value
from vlmforge.core.contracts import StageContract, TensorSpec
from vlmforge.core.errors import ExportError
from vlmforge.exporters import onnx_export as X


def _with_metadata(path_prefix: str) -> onnx.ModelProto:
    """A graph with an If subgraph and a function, every level carrying exporter debug metadata whose
    values hold an absolute path (as torch.onnx writes them), plus one entry of our own."""
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"], name="then_id")], "then", [],
                             [value("t", [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="else_neg")], "else", [], [value("e", [2])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)]
    m = model(nodes, [value("x", [2])], [value("y", [2])], [init("zero", np.array(0.0, np.float32))])
    entries = {"pkg.torch.onnx.stack_trace": f'File "{path_prefix}/src/model.py", line 3',
               "pkg.onnxscript.rewriter": f"{path_prefix}/x", "namespace": f"{path_prefix}: Module",
               "vlmforge.kept": "yes"}
    fn = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    m.functions.append(fn)
    # appended and attribute messages are copies: annotate the copies the model holds
    sub = [a.g for a in m.graph.node[2].attribute]
    targets = [m.graph, *m.graph.node, *m.graph.input, *m.graph.output, *m.graph.initializer,
               *sub, *(n for g in sub for n in g.node), *(v for g in sub for v in g.output),
               m.functions[0], *m.functions[0].node]
    for t in targets:
        for k, v in entries.items():
            t.metadata_props.add(key=k, value=v)
    return m


def _all_props(m: onnx.ModelProto) -> list[list[str]]:
    out = []
    graphs = [m.graph, *(a.g for a in m.graph.node[2].attribute)]
    for g in graphs:
        out.append([p.key for p in g.metadata_props])
        out += [[p.key for p in n.metadata_props] for n in g.node]
        out += [[p.key for p in v.metadata_props] for v in (*g.input, *g.output, *g.initializer)]
    for fn in m.functions:
        out.append([p.key for p in fn.metadata_props])
        out += [[p.key for p in n.metadata_props] for n in fn.node]
    return out


def test_normalize_model_drops_debug_metadata_everywhere_and_keeps_the_rest():
    m = X.normalize_model(_with_metadata("/home/alice/checkout"))
    props = _all_props(m)
    assert len(props) >= 15 and all(keys == ["vlmforge.kept"] for keys in props), [k for k in props if k != ["vlmforge.kept"]]
    assert [n.op_type for n in m.graph.node] == ["ReduceSum", "Greater", "If"]  # structure untouched


def test_normalize_model_makes_the_bytes_independent_of_the_checkout_path():
    a = X.normalize_model(_with_metadata("/home/alice/checkout")).SerializeToString(deterministic=True)
    b = X.normalize_model(_with_metadata("/srv/ci/build-17")).SerializeToString(deterministic=True)
    assert a == b
    assert _with_metadata("/a").SerializeToString(deterministic=True) != _with_metadata("/b").SerializeToString(
        deterministic=True)  # without it they differ
    again = onnx.ModelProto()
    again.ParseFromString(a)
    assert X.normalize_model(again).SerializeToString(deterministic=True) == a  # idempotent


def test_stamp_contract_dims_names_io_dims_and_leaves_a_rank_mismatch_alone():
    m = model([helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["z"], ["w"])],
              [value("x", ["s53", 4]), value("z", ["s1"])], [value("y", ["s53", "s9"]), value("w", ["s1"])])
    contract = StageContract("vision", (TensorSpec("x", "float32", ("num_patches", 4)),
                                        TensorSpec("z", "float32", ("a", "b"))),
                             (TensorSpec("y", "float32", ("num_patches", 8)), TensorSpec("w", "float32", ("c",))))
    X.stamp_contract_dims(m, contract)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert [dims(v) for v in m.graph.input] == [["num_patches", 4], ["s1"]]  # z: rank 1 vs 2, left alone
    assert [dims(v) for v in m.graph.output] == [["num_patches", 8], ["c"]]


def test_save_model_keeps_small_graphs_in_one_file_and_moves_large_weights_out(tmp_path, monkeypatch):
    w = np.arange(2048, dtype=np.float32).reshape(8, 256)  # 8 KiB: over save_model's 1 KiB per-tensor threshold
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [value("x", [1, 8])], [value("y", [1, 256])], [init("w", w)])
    (tmp_path / "small.onnx.data").write_bytes(b"stale")
    X.save_model(m, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()  # a stale data file of the same name is removed
    monkeypatch.setattr(X, "EXTERNAL_DATA_THRESHOLD", 4096)
    X.save_model(m, tmp_path / "big.onnx")
    loaded = onnx.load(str(tmp_path / "big.onnx"))
    assert (tmp_path / "big.onnx.data").stat().st_size >= w.nbytes
    assert np.array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), w)


class _TwoInputs(torch.nn.Module):
    def forward(self, x, grid):
        return x * 2 + grid


def test_export_module_refuses_inputs_that_are_not_the_contracts(tmp_path):
    contract = StageContract("vision", (TensorSpec("x", "float32", ("n",)), TensorSpec("image_grid_thw", "float32", ("n",))),
                             (TensorSpec("y", "float32", ("n",)),))
    with pytest.raises(ExportError, match=r"vision graph inputs are \['x', 'unused'\]; the contract .* need "
                                          r"\['x', 'image_grid_thw'\]") as err:
        X.export_module(_TwoInputs(), (torch.ones(3), torch.ones(3)), tmp_path / "vision.onnx", input_names=["x", "unused"],
                        output_names=["y"], stage="vision", contract=contract)
    assert err.value.where == str(tmp_path / "vision.onnx") and "bug" in err.value.fix
    assert not (tmp_path / "vision.onnx").exists()


@pytest.mark.parametrize("stage", ["vision", "decoder"])
def test_the_exporters_optimizer_gives_the_graph_of_onnxscripts_own(tmp_path, monkeypatch, stage):
    """optimize_graph is onnxscript's optimizer (what torch.onnx runs with optimize=True) less the rewrite rules
    in SKIPPED_REWRITES, with its own pass list: the tiny Qwen2.5-VL vision and decoder stages come out as the
    same bytes either way, so a skipped rule never applied and the pass list has not drifted from onnxscript's."""
    from onnxscript._framework_apis import torch_2_8

    from vlmforge.build.nodes import StageOptions
    from vlmforge.families.qwen2_5_vl.fixture import build_model
    from vlmforge.registry import get_family

    fam, model = get_family("qwen2_5_vl"), build_model(seed=0)
    options = StageOptions(image_size=fam.default_sizes[0] if stage == "vision" else None, deepstack=False)
    files = {}
    for which in ("vlmforge", "onnxscript"):
        if which == "onnxscript":
            monkeypatch.setattr(X, "optimize_graph", lambda model, stand_ins=None: torch_2_8.optimize(model) and set())
        path = tmp_path / which / f"{stage}.onnx"
        fam.stage(stage).export(model, options, path)
        files[which] = {p.name: p.read_bytes() for p in sorted(path.parent.iterdir())}
    assert list(files["vlmforge"]) == [f"{stage}.onnx"] and files["vlmforge"] == files["onnxscript"]
    assert any(getattr(r, "name", None) in X.SKIPPED_REWRITES for r in __import__("onnxscript").rewriter._DEFAULT_REWRITE_RULES)
