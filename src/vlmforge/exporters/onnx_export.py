"""Family-agnostic export mechanics: torch.onnx (dynamo) -> one `<stage>.onnx` (+ `.onnx.data`).

The dynamo exporter bakes its own external-data file name into the graph, so the model is exported
into a scratch folder and re-saved with `onnx.save` under its final name (field notes §6).
"""

from __future__ import annotations

import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch

from vlmforge.core.errors import ExportError, as_os_error, from_os_error

log = logging.getLogger(__name__)

OPSET = 18
# Below this size everything stays inside the .onnx file; above, weights go to `<name>.onnx.data`.
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024


def export_module(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    out_path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Any = None,
    stage: str = "",
    opset: int = OPSET,
    contract=None,
) -> Path:
    """Export `module(*args)` to `out_path` and return it. Raises ExportError with the stage named."""
    from vlmforge.loading import active_stand_ins

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    stand_ins = active_stand_ins()
    streamed = stand_ins is not None and bool(stand_ins.entries)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module,
                    args,
                    None if streamed else str(tmp_file),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset,
                    dynamo=True,
                    external_data=True,
                    optimize=True,
                    verbose=False,
                )
        except Exception as exc:  # torch raises many types here; re-raise as one user-facing error
            _forget_trace()
            oserr = as_os_error(exc)
            if oserr is not None:  # the disk, not the exporter: say where and how much
                raise from_os_error(oserr, f"writing the {stage or 'stage'} graph", where=str(out_path),
                                    needed=2 * sum(p.numel() * p.element_size() for p in module.parameters())) from None
            raise ExportError(
                f"torch.onnx export of stage {stage or module.__class__.__name__} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}",
                where=str(out_path),
                fix="this is a vlmforge bug for supported checkpoints; re-run with -v and report the log",
            ) from exc
        if streamed:  # the stand-ins' real values, from the checkpoint, one tensor at a time
            try:
                save_streamed(program, tmp_file, stand_ins, stage)
            except OSError as exc:
                raise from_os_error(exc, f"writing the {stage or 'stage'} graph", where=str(out_path)) from None
        del program
        # The structure only (a few MB at any size): names and dims are fixed on it, and the weights are
        # copied from the exporter's data file into `<stage>.onnx.data` one tensor at a time, in the layout
        # `save_model` gives a loaded model (same bytes), never as one in-memory proto.
        _forget_trace()
        from vlmforge.transforms.external import load_structure, save_like_onnx

        model = load_structure(tmp_file)
        if contract is not None:
            _check_input_names(model, contract, out_path)
            stamp_contract_dims(model, contract)
        save_like_onnx(normalize_model(model), tmp_file, out_path, EXTERNAL_DATA_THRESHOLD, consume=True)
    return out_path


def save_streamed(program, tmp_file: Path, stand_ins, stage: str) -> None:
    """Save an exported program whose large weights are stand-ins (vlmforge.loading.StandIns) as torch.onnx saves
    any program, except that every initializer viewing a stand-in's buffer is a lazy tensor: the bytes that view
    has of the real tensor, read from the checkpoint, cast and laid out as a materialised stage would be, computed
    when the writer reaches it and dropped after. Same files as the in-memory export; memory: one tensor."""
    import functools

    import numpy as np
    import onnx_ir as ir

    layers = 1 + max((int(m.group(1)) for e in stand_ins.entries.values() if (m := _LAYER.search(e[1]))), default=-1)
    for value in program.model.graph.initializers.values():
        view = _view_of(value.const_value)
        if view is None:
            continue
        address, shape, strides, itemsize = view
        found = stand_ins.find(address)
        if found is None:
            if int(np.prod(shape)) >= _stand_in_min():
                raise ExportError(f"the streamed {stage or 'stage'} export has a large initializer {value.name!r} "
                                  "that is not a checkpoint tensor", where=str(tmp_file),
                                  fix="this is a vlmforge bug: report it with the log")
            continue
        base = found[0]
        make = functools.partial(_real_view, stand_ins, base, shape, strides, (address - base) // itemsize, value.name,
                                 _layer_note(found[1][1], layers))
        value.const_value = ir.LazyTensor(make, dtype=value.const_value.dtype, shape=ir.Shape(shape))
    program.save(str(tmp_file), external_data=True)


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _layer_note(key: str, layers: int) -> str:
    """What the progress line says while a stand-in's real bytes are written: its decoder layer, or its name."""
    m = _LAYER.search(key)
    return f"writing weights: layer {int(m.group(1)) + 1}/{layers}" if m else f"writing weights: {key}"


def _real_view(stand_ins, base: int, shape, strides, offset: int, name: str, note: str):
    from torch.onnx._internal.exporter._core import TorchTensor  # what the exporter wraps weights in

    from vlmforge import progress

    progress.note(note)
    return TorchTensor(stand_ins.real(base).as_strided(shape, strides, offset).contiguous(), name)


def _stand_in_min() -> int:
    from vlmforge.loading import STAND_IN_MIN_ELEMENTS

    return STAND_IN_MIN_ELEMENTS


def _view_of(tensor):
    """(address, shape, strides in elements, element size) of an initializer held as a torch or NumPy array in
    memory; None for anything else (external, inline constants)."""
    import numpy as np

    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        if raw.device.type != "cpu" or raw.numel() == 0:
            return None
        return raw.data_ptr(), tuple(raw.shape), tuple(raw.stride()), raw.element_size()
    if isinstance(raw, np.ndarray) and raw.size:
        item = raw.dtype.itemsize
        if any(st % item for st in raw.strides):
            return None
        return (raw.__array_interface__["data"][0], tuple(raw.shape), tuple(st // item for st in raw.strides), item)
    return None


def _forget_trace() -> None:
    """Drop what torch.onnx leaves behind that holds the exported stage's weights, so they are freed with
    the stage's model (vlmforge.loading.release) instead of staying resident until the next export (the
    last stage's through the whole validation; measured at Qwen2.5-VL-3B widths, 2 layers: 2.1 GiB):
    - torch.export's map from fake tensors to the traced graph's nodes (whose `meta["val"]` are the real
      weights): torch clears it when the next trace starts, not when one ends;
    - onnxscript's rewrite rules (module globals, run by `optimize=True`): each pattern matcher keeps the
      graph, node and bindings of its last match, and that graph's initializers wrap the parameters. The
      matcher sets all three again at the start of every match."""
    import gc

    from torch.fx.experimental import proxy_tensor

    held = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(held, dict):
        held.clear()
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                if attr in obj.__dict__:
                    setattr(obj, attr, None)


def save_model(model: onnx.ModelProto, out_path: Path) -> Path:
    """Save with weights external under `<file>.data` when large; deterministic file names and bytes."""
    normalize_model(model)  # torch's debug metadata holds absolute paths: same bytes from any checkout
    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    data_path = out_path.with_name(data_name)
    if data_path.exists():
        data_path.unlink()
    # Summed initializer bytes, not model.ByteSize(): protobuf cannot serialise (or measure) a model >2 GiB.
    size = sum(len(t.raw_data) or onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * _numel(t)
               for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(out_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
            convert_attribute=False,
        )
    else:
        onnx.save_model(model, str(out_path))
    return out_path


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _check_input_names(model: onnx.ModelProto, contract, out_path: Path) -> None:
    """The exporter may prune an input the graph does not use (the fixed-shape vision graph ignores
    `image_grid_thw`); runtimes such as onnxruntime-genai still feed it, so a pruned input is an error."""
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if names != contract.input_names:
        raise ExportError(
            f"{contract.stage} graph inputs are {names}; the contract (and the runtimes) need {contract.input_names}",
            where=str(out_path),
            fix="this is a vlmforge bug: the exporter pruned or renamed an input the runtime feeds",
        )


def stamp_contract_dims(model: onnx.ModelProto, contract) -> None:
    """Name the graph's I/O dims as the contract does (the exporter invents names such as `s53`).

    Only I/O shapes are touched; a mismatch in rank is left for the contract validator to report.
    """
    specs = {t.name: t for t in (*contract.inputs, *contract.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        spec = specs.get(value.name)
        if spec is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            continue
        for dim, want in zip(dims, spec.shape):
            if isinstance(want, int):
                dim.Clear()
                dim.dim_value = want
            else:
                dim.Clear()
                dim.dim_param = want


# Exporter debug metadata: torch.onnx writes per-node stack traces with absolute source paths, FX node
# dumps and module scopes. They make the bytes depend on where the checkout lives.
DEBUG_METADATA_PREFIXES = ("pkg.torch.", "pkg.onnxscript.", "namespace")


def normalize_model(model):
    """Drop exporter debug metadata (stack traces with absolute paths, FX node dumps, module scopes, the
    ExportedProgram signature) from every graph, node and value of every graph and function, in place;
    returns the model.

    Only `metadata_props` entries whose key starts with DEBUG_METADATA_PREFIXES are removed: graph structure,
    names, initializers, opsets and the model-level producer fields stay as they are.
    """
    for graph in _graphs(model.graph):
        _strip_graph(graph)
    for fn in model.functions:
        _strip(fn.metadata_props)
        for node in fn.node:
            _strip(node.metadata_props)
            for sub in _subgraphs(node):
                for graph in _graphs(sub):
                    _strip_graph(graph)
    return model


def _strip_graph(graph) -> None:
    _strip(graph.metadata_props)
    for node in graph.node:
        _strip(node.metadata_props)
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in values:
            _strip(v.metadata_props)


def _subgraphs(node):
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _graphs(graph):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _strip(props) -> None:
    keep = [(p.key, p.value) for p in props if not p.key.startswith(DEBUG_METADATA_PREFIXES)]
    if len(keep) == len(props):
        return
    del props[:]
    for k, v in keep:
        props.add(key=k, value=v)
