"""The ONNX side of the transformers.js layout: graphs re-pointed at renamed external data, and `embed_tokens`.

transformers.js (Node) hands onnxruntime the path of `onnx/<session>.onnx` and declares its external data
as `<session>.onnx_data` (then `_data_1`, `_data_2`, ... for more chunks; `utils/model-loader.js`
getExternalDataChunkNames). onnxruntime opens the files the graph's tensors name in their `location`, so
the graph must name exactly those files. Renaming a data file therefore means rewriting the graph's
structure (the `location` entries; the graph is loaded without its weights) and hard-linking or copying
the weights file unchanged. Nothing here loads a weight tensor into memory as a whole: the embedding table
for `embed_tokens` is streamed from the set's embedding graph into its own data file in blocks.

onnxruntime-node 1.30 (inside @huggingface/transformers 4.3) refuses ONNX IR version 14, which onnx 1.23
writes by default for graphs made with `onnx.helper`: every graph written here keeps IR <= MAX_IR_VERSION.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from vlmforge.core.errors import ArtifactError
from vlmforge.core.hashing import CHUNK
from vlmforge.core.paths import confine, open_regular

MAX_IR_VERSION = 13  # onnxruntime-node 1.30: "Unsupported model IR version: 14, max supported IR version: 13"
DATA_SUFFIX = "_data"  # `<file>.onnx` + `_data`: transformers.js's external data name


def chunk_names(onnx_name: str, count: int) -> list[str]:
    """The external data files transformers.js fetches for `onnx_name` declared with `count` chunks."""
    return [f"{onnx_name}{DATA_SUFFIX}" + ("" if i == 0 else f"_{i}") for i in range(count)]


@dataclass(frozen=True)
class WrittenGraph:
    """One graph of the layout: its file, its data chunks (in transformers.js order) and what it holds."""

    path: Path
    data: tuple[Path, ...]
    ir_version: int


def load_structure(path: Path, where: str) -> onnx.ModelProto:
    """The graph without its external weights (they stay on disk, referenced by `location`)."""
    with open_regular(path, where) as f:
        raw = f.read()
    try:
        return onnx.load_model_from_string(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError has no stable import path
        if type(exc).__name__ != "DecodeError":
            raise
        raise ArtifactError(f"{path.name} is not an ONNX graph ({exc})", where=where, fix="rebuild the artifact set") from None


def _tensor_type(dtype: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def check_ir(model: onnx.ModelProto, where: str) -> None:
    if model.ir_version > MAX_IR_VERSION:
        raise ArtifactError(
            f"the graph has ONNX IR version {model.ir_version}; onnxruntime-node 1.30 inside transformers.js 4.3 "
            f"loads IR <= {MAX_IR_VERSION}", where=where,
            fix=f"rebuild the set with a toolchain that writes IR <= {MAX_IR_VERSION} (constraints.txt's pins do)")


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _external_tensors(model: onnx.ModelProto):
    for g in _graphs(model.graph):
        for t in list(g.initializer) + [s.values for s in g.sparse_initializer]:
            if t.data_location == TensorProto.EXTERNAL:
                yield t
        for node in g.node:
            for attr in node.attribute:
                tensors = [attr.t] if attr.type == onnx.AttributeProto.TENSOR else list(attr.tensors)
                yield from (t for t in tensors if t.data_location == TensorProto.EXTERNAL)


def _entry(t: TensorProto, key: str) -> str | None:
    return next((e.value for e in t.external_data if e.key == key), None)


def _set_entry(t: TensorProto, key: str, value: str) -> None:
    for e in t.external_data:
        if e.key == key:
            e.value = value
            return
    t.external_data.add(key=key, value=value)


def write_relocated(src: Path, root: Path, dst: Path, where: str, expected: dict[str, dict]) -> WrittenGraph:
    """Write graph `src` (a file of the artifact set `root`) as `dst`, its external data files renamed to
    transformers.js's chunk names beside `dst` (hard links where the file system allows, else copies
    checked against the manifest's sha256 in `expected`)."""
    model = load_structure(src, where)
    check_ir(model, where)
    tensors = list(_external_tensors(model))
    locations: list[str] = []
    for t in tensors:
        loc = _entry(t, "location")
        if loc is None:
            raise ArtifactError(f"tensor {t.name!r} is external but names no file", where=where, fix="rebuild the artifact set")
        if loc not in locations:
            locations.append(loc)
    rel_dir = src.parent.relative_to(root).as_posix()
    sources = [(confine(root, loc if rel_dir == "." else f"{rel_dir}/{loc}", where=where), loc) for loc in locations]
    names = dict(zip(locations, chunk_names(dst.name, len(locations))))
    for t in tensors:
        _set_entry(t, "location", names[_entry(t, "location")])
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_proto(model, dst)
    data = []
    for path, loc in sources:
        rel = path.relative_to(root.resolve()).as_posix()
        out = dst.with_name(names[loc])
        _link_or_copy(path, out, expected.get(rel), where)
        data.append(out)
    return WrittenGraph(dst, tuple(data), model.ir_version)


def _link_or_copy(src: Path, dst: Path, want: dict | None, where: str) -> None:
    if want is None:
        raise ArtifactError(f"{src.name} (external data of a graph) is not listed in the manifest", where=where,
                            fix="rebuild the artifact set; every file a graph reads must be listed")
    try:
        os.link(src, dst, follow_symlinks=False)
        if dst.stat().st_size != want["bytes"]:
            raise ArtifactError(f"{src.name} changed size while the layout was written", where=str(src),
                                fix="do not modify an artifact set while exporting it; run export-js again")
        return
    except OSError:
        pass  # another file system, or links refused: copy
    h = hashlib.sha256()
    with open_regular(src, where) as fin, open(dst, "xb") as fout:
        while block := fin.read(CHUNK):
            h.update(block)
            fout.write(block)
    if h.hexdigest() != want["sha256"]:
        raise ArtifactError(f"{src.name} changed while it was being copied", where=str(src),
                            fix="do not modify an artifact set while exporting it; run export-js again")


def _write_proto(model: onnx.ModelProto, dst: Path) -> None:
    """Serialise the structure only (external tensors stay references; no weights are written here)."""
    with open(dst, "xb") as f:
        f.write(model.SerializeToString())


# -- embed_tokens: input_ids -> inputs_embeds ---------------------------------------------------------------

def _token_table(model: onnx.ModelProto, ids_name: str, where: str) -> TensorProto:
    """The initializer the embedding graph gathers `ids_name` from: its token-embedding table."""
    inits = {t.name: t for t in model.graph.initializer}
    found = [inits[n.input[0]] for n in model.graph.node
             if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == ids_name and n.input[0] in inits]
    if len(found) != 1:
        ops = sorted({n.op_type for n in model.graph.node if ids_name in n.input})
        raise ArtifactError(
            f"the embedding graph has {len(found)} Gather nodes reading {ids_name!r} from a weight table (one "
            f"expected; ops reading it: {ops})", where=where,
            fix="transformers.js needs a plain token table: build the set without a quantized embedding "
                "(precision.int4.quantize_embedding=false)")
    table = found[0]
    if len(table.dims) != 2:
        raise ArtifactError(f"the token table {table.name!r} has shape {list(table.dims)}, not [vocab, hidden]",
                            where=where, fix="rebuild the artifact set")
    return table


def _stream_table(table: TensorProto, src: Path, root: Path, out_data: Path, where: str) -> int:
    """Copy the table's bytes into `out_data` block by block; returns the byte count."""
    if table.data_location != TensorProto.EXTERNAL:
        raw = table.raw_data or onnx.numpy_helper.to_array(table).tobytes()
        with open(out_data, "xb") as f:
            f.write(raw)
        return len(raw)
    loc, offset, length = _entry(table, "location"), int(_entry(table, "offset") or 0), _entry(table, "length")
    rel_dir = src.parent.relative_to(root).as_posix()
    path = confine(root, loc if rel_dir == "." else f"{rel_dir}/{loc}", where=where)
    if length is None:
        raise ArtifactError(f"the token table {table.name!r} has no external data length", where=where,
                            fix="rebuild the artifact set")
    remaining = int(length)
    with open_regular(path, where) as fin, open(out_data, "xb") as fout:
        fin.seek(offset)
        while remaining:
            block = fin.read(min(CHUNK, remaining))
            if not block:
                raise ArtifactError(f"{loc} ends before the token table does", where=where, fix="rebuild the artifact set")
            fout.write(block)
            remaining -= len(block)
    return int(length)


def write_embed_tokens(src: Path, root: Path, dst: Path, contract, where: str) -> WrittenGraph:
    """`embed_tokens`: one Gather over the token table of the set's embedding graph `src` (with a Cast when
    the graph's output type differs from the table's), its weights in `<dst>_data` (external, streamed).

    `contract` is the embedding stage's StageContract: input `input_ids`, output `inputs_embeds`."""
    model = load_structure(src, where)
    check_ir(model, where)
    ids_spec = next(s for s in contract.inputs if s.name == "input_ids")
    out_spec = next(s for s in contract.outputs if s.name == "inputs_embeds")
    table = _token_table(model, ids_spec.name, where)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(chunk_names(dst.name, 1)[0])
    nbytes = _stream_table(table, src, root, data, where)
    weight = TensorProto(name="embed_tokens.weight", data_type=table.data_type, dims=list(table.dims),
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", data.name), ("offset", "0"), ("length", str(nbytes))):
        weight.external_data.add(key=key, value=value)
    out_type = _tensor_type(out_spec.dtype)
    nodes = [helper.make_node("Gather", [weight.name, ids_spec.name], ["gathered" if out_type != table.data_type
                                                                       else out_spec.name])]
    if out_type != table.data_type:
        nodes.append(helper.make_node("Cast", ["gathered"], [out_spec.name], to=out_type))
    graph = helper.make_graph(
        nodes, "embed_tokens",
        [helper.make_tensor_value_info(ids_spec.name, _tensor_type(ids_spec.dtype),
                                       list(ids_spec.shape))],
        [helper.make_tensor_value_info(out_spec.name, out_type, list(out_spec.shape))],
        initializer=[weight],
    )
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    out = helper.make_model(graph, opset_imports=opsets, producer_name="vlmforge export-js",
                            ir_version=min(model.ir_version, MAX_IR_VERSION))
    _write_proto(out, dst)
    return WrittenGraph(dst, (data,), out.ir_version)


def copy_file(src: Path, dst: Path, where: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open_regular(src, where) as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
