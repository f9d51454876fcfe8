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

from pathlib import Path

import onnx

from vlmforge.exporters.onnx_export import save_model
from vlmforge.transforms.graph import load_graph, topological_sort, upstream_nodes

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
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_graph(src)
    blocked_nodes = sorted(rotary_nodes(model))
    converted = convert_float_to_float16(
        model,
        keep_io_types=not fp16_io,
        op_block_list=list(FP32_OPS),
        node_block_list=blocked_nodes,
        disable_shape_infer=False,
    )
    _drop_duplicate_nodes(converted)
    topological_sort(converted)
    save_model(converted, Path(dst))
    kept = sorted({n.op_type for n in model.graph.node if n.op_type in FP32_OPS})
    return {
        "transform": "cast_fp16",
        "io": "float16" if fp16_io else "float32",
        "fp32_op_types": list(FP32_OPS),
        "fp32_op_types_present": kept,
        "fp32_rotary_nodes": len(blocked_nodes),
    }


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
