"""FP32 -> FP16 with the numerically sensitive parts kept in FP32.

What stays FP32, and why (measured on the fixtures and known from the field, see the closing notes):
- Every RMSNorm as one region, from the square (Pow(x, 2) or Mul(x, x)) through ReduceMean, the eps Add,
  Sqrt, Reciprocal/Div and the x * 1/rms product to the weight Mul (`norm_nodes`): x^2 overflows FP16 above
  |x| = 256, which real Qwen-VL activations exceed ("!!!!" outputs in the field). LayerNormalization likewise.
  The op types alone (Pow, ReduceMean, Sqrt, Reciprocal, Div) stay blocked too, for chains of another shape.
- Softmax: attention scores are accumulated and normalised in FP32.
- Rotary position math (everything from the position-id input to Cos/Sin, and the vision rotary tables):
  FP16 cannot represent integer positions above 2048 exactly, so long contexts would get wrong angles.
- Range / CumSum / index arithmetic: integer-like values.
The converter inserts the Casts around blocked nodes, and a Cast back to FP16 after each one even when
its consumer is blocked too (Pow -> Cast(fp16) -> Cast(fp32) -> ReduceMean: x^2 overflows in between);
`_join_fp32_regions` removes those round trips, so a chain of blocked nodes is one FP32 region with one
Cast in and one out.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import onnx

from vlmforge.exporters.onnx_export import normalize_model, save_model
from vlmforge.transforms.external import external_tensors, load_structure, save_structure, stream_external
from vlmforge.transforms.graph import producers, topological_sort, upstream_nodes

FP32_OPS = (
    "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "Softmax", "Range", "CumSum", "Cos", "Sin",
)


POSITION_INPUTS = ("position_ids", "image_grid_thw")


def rotary_nodes(model: onnx.ModelProto) -> set[str]:
    """Every node on the path from the graph inputs to Cos/Sin (position ids -> angles).

    In our graphs that path starts only at position inputs: `position_ids` (HF computes angles from positions
    and constant inverse frequencies), or `image_grid_thw` in a dynamic vision graph (the patch positions come
    from the grid), plus the shape (never the values) of other inputs; anything else reaching it would mean
    activations are involved, so we refuse."""
    starts = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    names = upstream_nodes(model, starts, stop_at=set())
    graph_inputs = {i.name for i in model.graph.input}
    for n in model.graph.node:
        if n.name in names:
            bad = [i for i in n.input if i in graph_inputs and i not in POSITION_INPUTS and n.op_type != "Shape"]
            if bad:
                raise ValueError(f"rotary path of node {n.name} reaches graph input {bad}")
    return names


_NORM_STEPS = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul")


def norm_nodes(model: onnx.ModelProto) -> set[str]:
    """The nodes of every RMSNorm: square (Pow(x, .) or Mul(x, x)) -> ReduceMean -> Add eps -> Sqrt ->
    Reciprocal/Div, each the only consumer of the one before, up to the Mul/Div that takes x again, plus the
    weight Mul after it (its other input an initializer) when that is its only consumer. Anything of
    another shape is left out (its sensitive op types stay blocked one by one)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights = {t.name for t in model.graph.initializer}
    found: set[str] = set()
    for sq in model.graph.node:
        if not (sq.op_type == "Pow" or (sq.op_type == "Mul" and len(sq.input) == 2 and sq.input[0] == sq.input[1])):
            continue
        x, chain, node = sq.input[0], [sq], sq
        while True:
            nxt = consumers.get(node.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in _NORM_STEPS or (len(chain) == 1 and nxt[0].op_type != "ReduceMean"):
                chain = []
                break
            node = nxt[0]
            chain.append(node)
            if node.op_type in ("Mul", "Div") and x in node.input:
                break
        if not chain:
            continue
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Mul" and any(i in weights for i in after[0].input):
            chain.append(after[0])
        found.update(n.name for n in chain)
    return found


def convert_structure(model: onnx.ModelProto, *, fp16_io: bool = False) -> tuple[onnx.ModelProto, dict]:
    """The FP16 graph of `model` (its structure; external weights stay references) and the counts of the
    nodes blocked by name. Shared by the in-memory and the streaming (external data) paths."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if any(not n.name for n in model.graph.node):
        raise ValueError("cast_fp16 needs every node named (the converter blocks nodes by name)")
    rotary, norms = rotary_nodes(model), norm_nodes(model)
    original = {n.name for n in model.graph.node}
    with _value_info_from_dims():
        converted = convert_float_to_float16(
            model,
            keep_io_types=not fp16_io,
            op_block_list=list(FP32_OPS),
            node_block_list=sorted(rotary | norms),
            disable_shape_infer=False,
        )
    _drop_duplicate_nodes(converted)
    _join_fp32_regions(converted, original)
    topological_sort(converted)
    return converted, {"fp32_rotary_nodes": len(rotary), "fp32_norm_nodes": len(norms)}


def cast_fp16(src: Path, dst: Path, *, fp16_io: bool = False) -> dict:
    """Convert `src` to FP16 at `dst`. The converter (and its shape inference) only ever sees the graph
    structure: external weights stay references and are streamed and cast afterwards (transforms.external),
    so graphs of any size work and memory stays at one chunk of weights, not the model."""
    model = load_structure(src)
    external = {t.name: t.data_type for t in external_tensors(model)}
    converted, counts = convert_structure(model, fp16_io=fp16_io)
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
        **counts,
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


def _join_fp32_regions(model: onnx.ModelProto, original: set[str]) -> None:
    """Remove the FP16 round trips the converter puts between FP32 nodes: an inserted Cast(to=FP16) whose
    output feeds an inserted Cast(to=FP32) (the next blocked node's input cast). That consumer reads the
    FP32 tensor directly; the FP16 Cast goes when nothing else reads it. Only inserted Casts are touched
    (their input is FP32 by construction); the model's own Casts keep their meaning."""
    graph_outputs = {o.name for o in model.graph.output}
    prod = producers(model)
    rename: dict[str, str] = {}
    dropped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Cast" or node.name in original or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        up = prod.get(node.input[0])
        if up is None or up.op_type != "Cast" or up.name in original or _cast_to(up) != onnx.TensorProto.FLOAT16:
            continue
        if node.output[0] in graph_outputs:  # an FP32 graph output: keep its name, as an Identity of the FP32 value
            node.op_type, node.input[0] = "Identity", up.input[0]
            del node.attribute[:]
        else:
            rename[node.output[0]] = up.input[0]
            dropped.add(node.name)
    keep = [n for n in model.graph.node if n.name not in dropped]
    for n in keep:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    read = {i for n in keep for i in n.input} | graph_outputs
    keep = [n for n in keep if not (n.op_type == "Cast" and n.name not in original and n.output[0] not in read)]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


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
