"""Small hand-made graphs (onnx.helper, a few KB) for the transform, exporter and validator unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


def model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def value(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def rmsnorm_mlp(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """x [2, K] -> y = x @ w + b, then an RMSNorm (Pow, ReduceMean, Add eps, Sqrt, Div) and a Softmax:
    `h` (the normalised activations) and `p` (the softmax) are both outputs."""
    k, n = w.shape
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "b"], ["y"], name="bias"),
        helper.make_node("Pow", ["y", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean", keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="addeps"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
        helper.make_node("Div", ["y", "rms"], ["h"], name="div"),
        helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
    ]
    inits = [init("w", w), init("b", b), init("two", np.array(2.0, np.float32)),
             init("axes", np.array([-1], np.int64)), init("eps", np.array(1e-6, np.float32))]
    return model(nodes, [value("x", [2, k])], [value("y", [2, n]), value("h", [2, n]), value("p", [2, n])], inits)


def run(path: Path, feeds: dict) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def save(m: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    """`path`; with `external`, every tensor over ~30 bytes (onnx compares sys.getsizeof) in `<path>.data` (the small constants stay inline,
    as onnxruntime needs shape-determining constants such as ReduceMean's axes inline)."""
    if external:
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=64, convert_attribute=False)
    else:
        onnx.save_model(m, str(path))
    return path
