"""Transforms read FP32 stages whose external data files are hardlinks into the stage cache: onnx's own
loader refuses those (more than one hard link), `load_graph` reads them with a containment check."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmforge.core.errors import ArtifactError
from vlmforge.transforms.cast_fp16 import cast_fp16
from vlmforge.transforms.graph import load_graph


def _linear_graph(path, rng) -> np.ndarray:
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return w


def test_hardlinked_external_data_loads_and_transforms(tmp_path):
    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    cache.mkdir()
    scratch.mkdir()
    w = _linear_graph(cache / "m.onnx", np.random.default_rng(0))
    for name in ("m.onnx", "m.onnx.data"):
        os.link(cache / name, scratch / name)
    with pytest.raises(Exception, match="hard link"):
        onnx.load(str(scratch / "m.onnx"), load_external_data=True)
    model = load_graph(scratch / "m.onnx")
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    cast_fp16(scratch / "m.onnx", out)
    got = numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0])
    assert got.dtype == np.float16 and np.allclose(got, w, atol=1e-3)


def test_external_data_outside_the_graph_folder_is_refused(tmp_path):
    (tmp_path / "inner").mkdir()
    _linear_graph(tmp_path / "m.onnx", np.random.default_rng(1))
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../m.onnx.data"
    onnx.save_model(model, str(tmp_path / "inner" / "m.onnx"))
    with pytest.raises(ArtifactError, match="not a file in") as err:
        load_graph(tmp_path / "inner" / "m.onnx")
    assert "FORCE=1" in err.value.fix
