"""Small graph queries shared by the transforms, and loading a graph with its external data."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from vlmforge.core.errors import ArtifactError

_FIX = "the FP32 stage in the build cache is damaged: rebuild it with FORCE=1 (or `make clean`)"


def load_graph(path: Path) -> onnx.ModelProto:
    """`path` with every initializer's external data read in.

    The transforms read the FP32 stage from the build's scratch folder, whose files are hardlinks into
    the stage cache (no copy of several GB per build). `onnx.load(load_external_data=True)` refuses
    external data files with more than one hard link (its guard against hardlink attacks on untrusted
    models), so the data is read here instead, with the same containment rule: a location must name a
    file inside the graph's own folder.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    base = path.parent.resolve()
    handles: dict[Path, object] = {}
    try:
        for tensor in _tensors(model.graph):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            file = (base / info.location).resolve()
            if file.parent != base or not file.is_file():
                raise ArtifactError(f"external data {info.location!r} of tensor {tensor.name!r} is not a file in {base}",
                                    where=str(path), fix=_FIX)
            fh = handles.get(file) or handles.setdefault(file, open(file, "rb"))
            fh.seek(info.offset or 0)
            data = fh.read(info.length) if info.length else fh.read()
            if info.length and len(data) != info.length:
                raise ArtifactError(f"external data of tensor {tensor.name!r} is truncated ({file.name})",
                                    where=str(path), fix=_FIX)
            tensor.raw_data = data
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    finally:
        for fh in handles.values():
            fh.close()
    return model


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)


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
    """Reorder nodes so every input is produced before use (the FP16 converter appends input Casts last).

    The order is level by level: first every node whose inputs are all graph inputs or initializers, then every
    node whose inputs those produce, and so on, each level in the original order; computed from each node's level
    (one more than its inputs' producers' highest) in time linear in the graph (a pass per level took 2.7 s on the
    32-block vision tower)."""
    from collections import deque

    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    producer: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for name in node.output:
            if name not in available:
                producer.setdefault(name, k)
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    missing = [False] * len(nodes)
    for k, node in enumerate(nodes):
        mine = set()
        for name in node.input:
            if name in available:
                continue
            if name not in producer:
                missing[k] = True
                continue
            mine.add(producer[name])
        deps.append(mine)
        for d in mine:
            users[d].append(k)
    level = [0] * len(nodes)
    waiting = [len(d) for d in deps]
    ready = deque(k for k in range(len(nodes)) if not waiting[k] and not missing[k])
    done = [False] * len(nodes)
    while ready:
        k = ready.popleft()
        done[k] = True
        for u in users[k]:
            level[u] = max(level[u], level[k] + 1)
            waiting[u] -= 1
            if not waiting[u] and not missing[u]:
                ready.append(u)
    stuck = [k for k in range(len(nodes)) if not done[k]]
    if stuck:
        raise ValueError(f"graph has a cycle or a dangling input near node {nodes[stuck[0]].name}")
    ordered = [nodes[k] for k in sorted(range(len(nodes)), key=lambda k: (level[k], k))]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
