"""FP32 -> FP16 with the numerically sensitive parts kept in FP32.

What stays FP32, and why (measured on the fixtures and known from the field, see the closing notes):
- RMSNorm's reduction (Pow, ReduceMean, Sqrt, Reciprocal, Div): x^2 overflows FP16 above |x| = 256, which real
  Qwen-VL activations exceed ("!!!!" outputs in the field). LayerNormalization likewise.
- Softmax: attention scores are accumulated and normalised in FP32.
- Rotary position math (everything from the position-id input to Cos/Sin, and the vision rotary tables):
  FP16 cannot represent integer positions above 2048 exactly, so long contexts would get wrong angles.
- Range / CumSum / index arithmetic: integer-like values.
The converter inserts the Casts around blocked nodes.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import onnx

from vlmforge.exporters.onnx_export import normalize_model, save_model
from vlmforge.transforms.external import external_tensors, load_structure, save_structure, stream_external
from vlmforge.transforms.graph import topological_sort, upstream_nodes

FP32_OPS = (
    "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "Softmax", "Range", "CumSum", "Cos", "Sin",
)


def rotary_nodes(model: onnx.ModelProto) -> set[str]:
    """Every node on the path from the graph inputs to Cos/Sin (position ids -> angles).

    In our graphs that path starts only at `position_ids` (HF computes angles from positions and constant
    inverse frequencies); anything else reaching it would mean activations are involved, so we refuse."""
    starts = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    names = upstream_nodes(model, starts, stop_at=set())
    graph_inputs = {i.name for i in model.graph.input}
    for n in model.graph.node:
        if n.name in names:
            bad = [i for i in n.input if i in graph_inputs and i != "position_ids"]
            if bad:
                raise ValueError(f"rotary path of node {n.name} reaches graph input {bad}")
    return names


def cast_fp16(src: Path, dst: Path, *, fp16_io: bool = False) -> dict:
    """Convert `src` to FP16 at `dst`. The converter (and its shape inference) only ever sees the graph
    structure: external weights stay references and are streamed and cast afterwards (transforms.external),
    so graphs of any size work and memory stays at one chunk of weights, not the model."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_structure(src)
    external = {t.name: t.data_type for t in external_tensors(model)}
    blocked_nodes = sorted(rotary_nodes(model))
    with _value_info_from_dims():
        converted = convert_float_to_float16(
            model,
            keep_io_types=not fp16_io,
            op_block_list=list(FP32_OPS),
            node_block_list=blocked_nodes,
            disable_shape_infer=False,
        )
    _drop_duplicate_nodes(converted)
    topological_sort(converted)
    if external:
        cast = {t.name for t in external_tensors(converted)
                if external.get(t.name) == onnx.TensorProto.FLOAT and t.data_type == onnx.TensorProto.FLOAT16}
        stream_external(converted, Path(src), Path(dst), cast)
        save_structure(normalize_model(converted), Path(dst))
    else:
        save_model(converted, Path(dst))
    kept = sorted({n.op_type for n in model.graph.node if n.op_type in FP32_OPS})
    return {
        "transform": "cast_fp16",
        "io": "float16" if fp16_io else "float32",
        "fp32_op_types": list(FP32_OPS),
        "fp32_op_types_present": kept,
        "fp32_rotary_nodes": len(blocked_nodes),
    }


@contextmanager
def _value_info_from_dims():
    """Scoped patch: onnxruntime 1.31's `float16.make_value_info_from_tensor` calls
    `numpy_helper.to_array(tensor)` only to take the tensor's shape, which reads an external tensor's whole
    data file (relative to the working directory, so it fails outright outside the graph's folder). The
    shape is in `tensor.dims`; use that for the duration of one conversion."""
    import onnxruntime.transformers.float16 as f16

    original = f16.make_value_info_from_tensor
    f16.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        f16.make_value_info_from_tensor = original


def _drop_duplicate_nodes(model: onnx.ModelProto) -> None:
    """The converter inserts one identical Cast (same name, input and output) per blocked consumer of a
    tensor; a second copy makes the graph invalid. Keep the first of each exact duplicate."""
    seen: set[bytes] = set()
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
