"""Small graph queries shared by the transforms."""

from __future__ import annotations

import onnx


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def upstream_nodes(model: onnx.ModelProto, start: list[onnx.NodeProto], stop_at: set[str]) -> set[str]:
    """Names of the nodes feeding `start` (included), walking back until graph inputs/initializers/`stop_at`."""
    prod = producers(model)
    seen: set[str] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for i in node.input:
            if i in stop_at or i not in prod:
                continue
            stack.append(prod[i])
    return seen


def initializer_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in model.graph.initializer}


def weight_matmuls(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[int]]]:
    """MatMul nodes whose second input is a 2-D initializer [K, N] (the linear layers)."""
    shapes = initializer_shapes(model)
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and len(shapes.get(n.input[1], [])) == 2:
            out.append((n, shapes[n.input[1]]))
    return out


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so every input is produced before use (the FP16 converter appends input Casts last)."""
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        progressed = []
        rest = []
        for node in pending:
            (progressed if all(i in available for i in node.input) else rest).append(node)
        if not progressed:
            raise ValueError(f"graph has a cycle or a dangling input near node {rest[0].name}")
        for node in progressed:
            ordered.append(node)
            available.update(node.output)
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
