"""Graphs with external data go through the FP16 cast, the INT4 quantizer and the contract check without a
whole-model protobuf (a graph over 2 GiB cannot be serialised; every FP16 transform of one failed).

Here the path is exercised at small size (the external-data threshold is lowered so a 3 MB graph keeps its
weights in `decoder.onnx.data`). Measured by hand on a 2.15 GB FP32 graph (8 x 8192^2 MatMuls, the same
builder): cast_fp16 before: EncodeError after 11.5 s at 5.9 GB RSS; after: 34.5 s, 521 MiB peak, output
within 3.8e-6 of FP32. quantize_int4 25.4 s, 3.0 GB peak. check_contract 0.4 s, 50 MiB, also on hardlinks.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmforge.core.contracts import StageContract, TensorSpec
from vlmforge.exporters import onnx_export

DIM = 256


def build_graph(out: Path, n: int = 3, dim: int = DIM) -> Path:
    """MatMul -> RMS-style norm (Mul, ReduceMean, Add, Sqrt, Div: kept FP32 by cast_fp16) per layer,
    then Softmax; weights are fan-in scaled so the outputs are not flat."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        w = ((rng.random((dim, dim), dtype=np.float32) - 0.5) * (2 * 3 ** 0.5 / dim ** 0.5)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Mul", [f"h{i}", f"h{i}"], [f"sq{i}"], name=f"sq{i}"),
                  helper.make_node("ReduceMean", [f"sq{i}", "axes"], [f"ms{i}"], name=f"rm{i}", keepdims=1),
                  helper.make_node("Add", [f"ms{i}", "eps"], [f"mse{i}"], name=f"eps{i}"),
                  helper.make_node("Sqrt", [f"mse{i}"], [f"rms{i}"], name=f"sqrt{i}"),
                  helper.make_node("Div", [f"h{i}", f"rms{i}"], [f"n{i}"], name=f"div{i}")]
        x = f"n{i}"
    nodes.append(helper.make_node("Softmax", [x], ["y"], name="softmax", axis=-1))
    inits += [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
              numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], inits)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_export.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), out)
    return out


@pytest.fixture
def external_graph(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1 << 16)
    src = build_graph(tmp_path / "fp32" / "decoder.onnx")
    assert (tmp_path / "fp32" / "decoder.onnx.data").stat().st_size == 3 * DIM * DIM * 4
    return src


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _old_cast(src: Path, dst: Path) -> None:
    """The whole-model conversion cast_fp16 did before (weights in memory, inline output), with the same
    structure conversion (convert_structure, shared by both paths): the reference."""
    from vlmforge.transforms.cast_fp16 import convert_structure
    from vlmforge.transforms.graph import load_graph

    out, _ = convert_structure(load_graph(src))
    onnx.save_model(out, str(dst))


def test_cast_fp16_streams_external_weights_and_matches_the_in_memory_conversion(external_graph, tmp_path):
    from vlmforge.transforms.cast_fp16 import cast_fp16

    dst = tmp_path / "fp16" / "decoder.onnx"
    dst.parent.mkdir()
    record = cast_fp16(external_graph, dst)
    assert {"Div", "ReduceMean", "Softmax", "Sqrt"} <= set(record["fp32_op_types_present"])
    data = dst.with_name("decoder.onnx.data")
    assert data.stat().st_size >= 3 * DIM * DIM * 2 and data.stat().st_size < 3 * DIM * DIM * 4
    structure = onnx.load(str(dst), load_external_data=False)
    types = {t.name: t.data_type for t in structure.graph.initializer}
    assert all(types[f"w{i}"] == TensorProto.FLOAT16 for i in range(3))
    ref = tmp_path / "ref" / "decoder.onnx"
    ref.parent.mkdir()
    _old_cast(external_graph, ref)
    x = np.random.default_rng(1).standard_normal((2, DIM)).astype(np.float32)
    got, want = _run(dst, x), _run(ref, x)
    assert np.array_equal(got, want)  # same graph, same FP16 bytes
    assert np.abs(got - _run(external_graph, x)).max() < 1e-3


def test_cast_fp16_reads_hardlinked_stage_files_and_refuses_data_outside_the_folder(external_graph, tmp_path):
    from vlmforge.core.errors import ArtifactError
    from vlmforge.transforms.cast_fp16 import cast_fp16

    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("decoder.onnx", "decoder.onnx.data"):
        os.link(external_graph.with_name(name), linked / name)
    (tmp_path / "out").mkdir()
    cast_fp16(linked / "decoder.onnx", tmp_path / "out" / "decoder.onnx")
    model = onnx.load(str(external_graph), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere.data"
    bad = tmp_path / "bad" / "decoder.onnx"
    bad.parent.mkdir()
    onnx.save_model(model, str(bad))
    (tmp_path / "elsewhere.data").write_bytes(b"\0" * (3 * DIM * DIM * 4))
    (tmp_path / "bad-out").mkdir()
    with pytest.raises(ArtifactError, match="is not a file in"):
        cast_fp16(bad, tmp_path / "bad-out" / "decoder.onnx")


def test_quantize_int4_and_contract_check_on_external_data(external_graph, tmp_path):
    from vlmforge.transforms.quantize_int4 import quantize_int4
    from vlmforge.validators.contract import check_contract

    cfg = SimpleNamespace(algorithm="default", block_size=32, symmetric=True, accuracy_level=4,
                          quantize_lm_head=True, quantize_embedding=False)
    dst = tmp_path / "int4" / "decoder.onnx"
    dst.parent.mkdir()
    record = quantize_int4(external_graph, dst, cfg)
    assert record["quantized_nodes"] == 3
    x = np.random.default_rng(2).standard_normal((2, DIM)).astype(np.float32)
    assert np.abs(_run(dst, x) - _run(external_graph, x)).max() < 1e-2
    contract = StageContract("decoder", (TensorSpec("x", "float32", ("batch", DIM)),),
                             (TensorSpec("y", "float32", ("batch", DIM)),))
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("decoder.onnx", "decoder.onnx.data"):
        os.link(external_graph.with_name(name), linked / name)  # stage files are hardlinks into the cache
    for path in (external_graph, linked / "decoder.onnx", dst):
        assert all(c.passed for c in check_contract(path, contract)), path
    with open(linked / "decoder.onnx.data", "r+b") as fh:
        fh.truncate(DIM * DIM * 4 * 2 + 100)
    checks = check_contract(linked / "decoder.onnx", contract)
    assert not checks[0].passed and "w2" in checks[0].detail
    broken = onnx.load(str(external_graph), load_external_data=False)
    broken.graph.node[1].input[0] = "nowhere"  # a node reading a tensor nothing produces
    onnx.save_model(broken, str(external_graph))
    assert not check_contract(external_graph, contract)[0].passed
