"""Family-agnostic export mechanics: torch.onnx (dynamo) -> one `<stage>.onnx` (+ `.onnx.data`).

The program is traced with torch.onnx (optimize=False), optimized here (optimize_graph: onnxscript's pass list),
and saved by onnx_ir into a scratch folder under the stage's final name, so the data file it writes is already
`<stage>.onnx.data` (the exporter bakes that name into the graph, field notes §6). The structure alone is then
normalised and stamped with the contract's dims; a large graph's data file is moved next to it as written, a
small graph is saved as one file. In a streamed stage (vlmforge.loading.StandIns) the weights are traced as
stand-ins and each one's bytes are read from the checkpoint when the writer reaches it. Within
`transformed_on_save`, the graph written is the transform's (a streamed INT4 decoder: quantized from the checkpoint,
its FP32 graph never written).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import time
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


class NotLayered(Exception):
    """A trace function cannot assemble the module from pieces; the whole module is traced."""


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
    trace=None,
) -> Path:
    """Export `module(*args)` to `out_path` and return it. Raises ExportError with the stage named.

    `trace(module, args, input_names, output_names, opset)`, when given, builds the unoptimized ir.Model in place of
    torch.onnx.export of the whole module (exporters.layered: a decoder or a vision tower traced once per kind of
    layer); where it raises NotLayered, the whole module is traced."""
    from vlmforge.loading import active_stand_ins

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    stand_ins = active_stand_ins()
    streamed = stand_ins is not None and bool(stand_ins.entries)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        tmp_file = Path(tmp) / out_path.name  # its weights in `<name>.data` beside it, as the set names them
        try:
            t0 = time.perf_counter()
            program = _traced_by(trace, module, args, input_names, output_names, opset, stage)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = program or torch.onnx.export(
                    module,
                    args,
                    None,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset,
                    dynamo=True,
                    external_data=True,
                    optimize=False,  # optimize_graph below, then saved here (as torch.onnx would save it)
                    verbose=False,
                )
                t1 = time.perf_counter()
                folded = optimize_graph(program.model, stand_ins if streamed else None)
                log.debug("%s: traced in %.1f s, optimized in %.1f s (%d nodes)", stage or "stage", t1 - t0,
                          time.perf_counter() - t1, len(program.model.graph))
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
        from vlmforge.transforms.external import initializer_bytes, load_structure, save_like_onnx, save_structure

        on_save = _ON_SAVE
        t2 = time.perf_counter()
        try:
            src, structure = tmp_file, None
            if streamed and on_save is not None:  # nothing written yet: the transform reads the checkpoint
                src, structure = unsaved_structure(program, tmp_file, stand_ins, stage, folded)
            elif streamed:  # the stand-ins' real values, from the checkpoint, one tensor at a time
                save_streamed(program, tmp_file, stand_ins, stage, folded)
            else:
                save_program(program, tmp_file)
            del program
            # The structure only (a few MB at any size): names and dims are fixed on it, never as one in-memory
            # proto with the weights. A small graph is written as one file; a large one keeps the exporter's
            # data file as it is (moved, not copied: the weights are written once).
            _forget_trace()
            model = normalize_model(structure if structure is not None else load_structure(tmp_file))
            del structure
            if contract is not None:
                _check_input_names(model, contract, out_path)
                stamp_contract_dims(model, contract)
            if on_save is not None:  # the transformed graph is the one written (the FP32 one only in scratch, if at all)
                function, record = on_save
                t3 = time.perf_counter()
                record.update(function(model, src, out_path))
                log.debug("%s: structure in %.1f s, transformed and written in %.1f s", stage or "stage", t3 - t2,
                          time.perf_counter() - t3)
            elif initializer_bytes(model, tmp_file) <= EXTERNAL_DATA_THRESHOLD:
                save_like_onnx(model, tmp_file, out_path, EXTERNAL_DATA_THRESHOLD, consume=True)
            else:
                save_structure(model, tmp_file)
                data = tmp_file.with_name(tmp_file.name + ".data")
                os.replace(data, out_path.with_name(data.name))
                os.replace(tmp_file, out_path)
            if on_save is None:
                log.debug("%s: written in %.1f s", stage or "stage", time.perf_counter() - t2)
        except OSError as exc:
            raise from_os_error(exc, f"writing the {stage or 'stage'} graph", where=str(out_path)) from None
    return out_path


class _Assembled:
    """An assembled ir.Model where the rest of export_module expects torch.onnx's ONNXProgram (`.model`)."""

    def __init__(self, model) -> None:
        self.model = model


def _traced_by(trace, module, args, input_names, output_names, opset: int, stage: str):
    if trace is None:
        return None

    try:
        return _Assembled(trace(module, args, list(input_names), list(output_names), opset))
    except NotLayered as exc:
        _forget_trace()
        log.info("%s: traced whole (%s)", stage or "stage", exc)
        return None


_ON_SAVE = None  # (function, record) while exports are saved through a transform (transformed_on_save)


@contextlib.contextmanager
def transformed_on_save(function):
    """Within it, export_module writes `function(structure, src, out_path)`'s graph instead of the FP32 graph and
    puts the record it returns into the yielded dict. `structure` is the FP32 graph as a saved one would load
    (load_structure), normalised, its names and dims checked against the contract; `src` is where its external
    tensors are read (transforms.external: the FP32 file in scratch, or, for a streamed export, a StandInData: the
    checkpoint, one tensor at a time). A streamed INT4 decoder is so quantized without its FP32 graph being written
    (at Qwen2.5-VL-3B widths: 12 GB not written to the disk and read back)."""
    global _ON_SAVE
    record: dict = {}
    _ON_SAVE = (function, record)
    try:
        yield record
    finally:
        _ON_SAVE = None


def save_program(program, path: Path) -> None:
    """Save an exported program as torch.onnx does (onnx_ir's writer, weights in `<name>.data`), except that
    tensors under 1 KiB stay in the graph (as `onnx.save_model` leaves them), not 4-byte scalars in the data
    file."""
    import onnx_ir as ir

    ir.save(program.model, str(path), external_data=path.name + ".data", size_threshold_bytes=1024)


# onnxscript rewrite rules left out of the exporter's optimizer: SlicesSplit (two Slices of one tensor into a Split)
# never applies to these graphs (rotate_half slices to the end, not to the last dimension's size) and its
# two-output pattern search was 6.8 s of each pass over the 32-block Qwen2.5-VL-3B vision graph (two passes: 14 s
# of its 48 s export); the graphs are the same bytes without it.
SKIPPED_REWRITES = ("SlicesSplit",)


def optimize_graph(model, stand_ins=None) -> set[str]:
    """What `torch.onnx.export(optimize=True)` runs (onnxscript's `optimize_ir`, then its ONNX fusions), in place,
    with two differences: the rewrite rules are onnxscript's defaults less SKIPPED_REWRITES, and in a streamed
    export (`stand_ins`) no value is computed from a stand-in's meaningless bytes. Constant folding reads no input
    of STAND_IN_MIN_ELEMENTS or more (the exporter's own limit, 8192 elements, is below the default minimum; a
    lower minimum lowers it with it), and a node reading a stand-in is never folded, except a Transpose (always
    folded, into a view of its input): returns the names of those Transposes' outputs, which save_streamed
    checks are views of a stand-in. The pass list is `optimize_ir`'s (onnxscript 0.7, pinned)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding as folding
    from onnxscript.rewriter import onnx_fusions

    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) not in SKIPPED_REWRITES]
    limit = min(folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT, _stand_in_min() - 1)
    transposed: set[str] = set()

    def should_fold(node):
        if stand_ins is None or not any(_reads_stand_in(v, stand_ins) for v in node.inputs if v is not None):
            return None  # onnxscript's own rules
        if node.domain in ("", "ai.onnx") and node.op_type == "Transpose":
            transposed.update(o.name for o in node.outputs)
            return None
        return False

    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                folding.FoldConstantsPass(shape_inference=True, input_size_limit=limit,
                                          output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                          should_fold=should_fold),
                rewriter.RewritePass(rules),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)
    onnx_fusions.fuse(model)
    return transposed


def _reads_stand_in(value, stand_ins) -> bool:
    view = _view_of(value.const_value) if value.const_value is not None else None
    return view is not None and stand_ins.find(view[0]) is not None


def save_streamed(program, tmp_file: Path, stand_ins, stage: str, transposed: set[str] = frozenset()) -> None:
    """Save an exported program whose large weights are stand-ins (vlmforge.loading.StandIns) as torch.onnx saves
    any program, except that every initializer viewing a stand-in's buffer is a lazy tensor: the bytes that view
    has of the real tensor, read from the checkpoint, cast and laid out as a materialised stage would be, computed
    when the writer reaches it and dropped after. Same files as the in-memory export; memory: one tensor."""
    import onnx_ir as ir

    for value, make in _stand_in_views(program, tmp_file, stand_ins, stage, transposed):
        value.const_value = ir.LazyTensor(make, dtype=value.const_value.dtype, shape=value.const_value.shape)
    save_program(program, tmp_file)


def unsaved_structure(program, tmp_file: Path, stand_ins, stage: str, transposed: set[str] = frozenset()):
    """(StandInData, structure) of an exported program whose large weights are stand-ins, nothing written: the
    structure is the ModelProto save_streamed's file would load as (load_structure), except that each stand-in's
    view is an external reference into the StandInData (computed from the checkpoint when read) and the other
    initializers are inline. A transform reads it like a saved FP32 graph (transforms.external takes either)."""
    import onnx_ir as ir

    from vlmforge.transforms.external import STAND_IN_LOCATION, StandInData

    makers = []
    for value, make in _stand_in_views(program, tmp_file, stand_ins, stage, transposed):
        tensor = value.const_value
        makers.append(functools.partial(_as_array, make))
        value.const_value = ir.ExternalTensor(STAND_IN_LOCATION, len(makers) - 1, tensor.nbytes, tensor.dtype,
                                              shape=tensor.shape, name=value.name)
    return StandInData(makers, tmp_file), ir.serde.serialize_model(program.model)


class _Held:
    """A NumPy array's owner that keeps the torch tensor alive: a pooled stand-in buffer (StandIns.view) goes back
    to the pool when its tensor's Python object dies, even if a NumPy view of it (`tensor.numpy()`) lives on."""

    def __init__(self, tensor) -> None:
        self.tensor = tensor
        self.__array_interface__ = tensor.numpy().__array_interface__


def _as_array(make):
    import numpy as np

    return np.asarray(_Held(make().raw))


def _stand_in_views(program, tmp_file: Path, stand_ins, stage: str, transposed: set[str]):
    """(initializer, function computing its real values as a TorchTensor) for every initializer of the program that
    views a stand-in's buffer. No other initializer holds a stand-in's bytes (optimize_graph folds nothing that reads
    one but Transposes); a folded Transpose of a stand-in (`transposed`) that is not a view of it would, and is
    refused."""
    counts = _block_counts(e[1] for e in stand_ins.entries.values())
    out = []
    for value in program.model.graph.initializers.values():
        view = _view_of(value.const_value)
        if view is None:
            continue
        address, shape, strides, itemsize = view
        found = stand_ins.find(address)
        if found is None:
            if value.name in transposed:
                raise ExportError(f"the streamed {stage or 'stage'} export folded a Transpose of a checkpoint tensor "
                                  f"into a copy ({value.name!r}), not a view of it", where=str(tmp_file),
                                  fix="this is a vlmforge bug (an onnxscript that folds differently?): report it")
            continue
        base = found[0]
        out.append((value, functools.partial(_real_view, stand_ins, base, shape, strides, (address - base) // itemsize,
                                             value.name, _layer_note(found[1][1], counts))))
    return out


_BLOCK = re.compile(r"\.(layers|blocks)\.(\d+)\.")  # a decoder layer's / a ViT block's parameter
_KIND = {"layers": "layer", "blocks": "block"}


def _block_counts(keys) -> dict[str, int]:
    """How many decoder layers / ViT blocks the checkpoint keys name ({"layers": 36}, {"blocks": 32})."""
    counts: dict[str, int] = {}
    for key in keys:
        if m := _BLOCK.search(key):
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    return counts


def _layer_note(key: str, counts: dict[str, int]) -> str:
    """What the progress line says while a stand-in's real bytes are written: its decoder layer or ViT block,
    or its name."""
    m = _BLOCK.search(key)
    if m is None:
        return f"writing weights: {key}"
    return f"writing weights: {_KIND[m.group(1)]} {int(m.group(2)) + 1}/{counts[m.group(1)]}"


def _real_view(stand_ins, base: int, shape, strides, offset: int, name: str, note: str):
    from torch.onnx._internal.exporter._core import TorchTensor  # what the exporter wraps weights in

    from vlmforge import progress

    progress.note(note)
    return TorchTensor(stand_ins.view(base, shape, strides, offset), name)


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
    - onnxscript's rewrite rules (module globals, run by optimize_graph): each pattern matcher keeps the
      graph, node and bindings of its last match, and that graph's initializers wrap the parameters. The
      matcher sets all three again at the start of every match.
    Only the rules optimize_graph runs are visited (a scan of every live object for matchers took 2-3 s per
    stage at 3B widths)."""
    from torch.fx.experimental import proxy_tensor

    held = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(held, dict):
        held.clear()
    try:
        from onnxscript import rewriter
    except ImportError:  # no onnxscript: nothing ran, nothing to clear
        return
    for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()):
        matcher = getattr(rule, "_matcher", None)
        for attr in ("_graph", "_match", "_current_node", "_tracer"):
            if matcher is not None and attr in getattr(matcher, "__dict__", {}):
                setattr(matcher, attr, None)


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
