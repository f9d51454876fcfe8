"""Per-stage model materialisation: the HF model built on the meta device, with only the parameters one
stage needs read from the safetensors shards and cast per tensor, freed when the stage is done.

Why: `from_pretrained` at FP32 holds the whole model (15 GB for a 3B) through every export, and each export
adds its own copies on top. A stage needs only its part: the vision tower, the embedding table, or the
decoder layers with the final norm and the head. The family names which parameter prefixes a stage reads
(`FamilySpec.stage_weights`) and how the hub names a parameter when its checkpoints predate transformers 5's
layout (`FamilySpec.checkpoint_name`); nothing here knows a family.

The model is constructed exactly as `_from_config` builds it (same modules, same computed buffers such as
the rotary frequencies, which stay real), except that every parameter lands on the meta device as it is
registered, so construction allocates nothing. Linear weights are kept transposed in memory and handed to the
model as transpose views: torch.onnx folds a decoder MatMul's `Transpose(weight)` into a NumPy view of that
buffer instead of a copy, so the exporter holds each decoder weight once, not twice (the graph's bytes are
the same: only the strides differ, and the exporter writes values). Tied parameters (a tied LM head) are one tensor, read once
under any of their names. Reads use safetensors only, from the files `source.open_source` checked (headers,
sizes, hashes); a tensor missing, duplicated across files or of another shape is a CheckpointError.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from typing import Iterator

from vlmforge import progress
from vlmforge.core.errors import CheckpointError
from vlmforge.core.memory import give_back

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stage_model(source, hf_config, stage: str, dtype: str = "float32", loaded=None, streamed: bool = False) -> Iterator:
    """The HF model with the parameters `stage` needs materialised (as `dtype`), the rest on meta; its
    weights are released on exit. `loaded`: a whole model already in memory, used as it is.

    `streamed`: the large parameters are stand-ins instead (see StandIns): the exporter traces them and
    `exporters.onnx_export` writes their real values into the graph's data file one tensor at a time, read
    from the checkpoint, so the stage's weights are never all in memory."""
    if loaded is not None:
        yield loaded
        return
    model = meta_model(source, hf_config, dtype)
    prefixes = (source.family.stage_weights or {}).get(stage)  # None: the family did not say, so everything
    stand_ins = StandIns() if streamed else None
    names = materialise(model, source, prefixes, dtype, stand_ins=stand_ins)
    log.info("%s: %d tensors %s from the checkpoint", stage, len(names),
             f"planned ({len(stand_ins.entries)} streamed at export)" if streamed else "materialised")
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, stand_ins
    try:
        yield model
    finally:
        _ACTIVE = previous
        release(model, names)
        del model
        give_back()


# A parameter of at least this many elements is a stand-in in a streamed stage. Above onnxscript's constant-folding
# input limit (8192 elements), so no folded op but the always-folded Transpose can read a stand-in's (meaningless)
# values; above the initializer de-duplication limit (1024), so two stand-ins are never merged for equal bytes.
STAND_IN_MIN_ELEMENTS = 8193
_ACTIVE = None  # the StandIns of the streamed stage being exported, if any


def active_stand_ins():
    return _ACTIVE


class StandIns:
    """Large parameters of a streamed stage, each an uninitialised buffer of the real layout and dtype (never
    touched, so never resident: its pages are only reserved), keyed by the buffer's address. The exporter
    traces them like real weights; an initializer of the exported graph that is a view of one (the parameter,
    or its Transpose folded into a view of the buffer) is identified by its address, and its real bytes are
    computed from the checkpoint tensor when the data file is written."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple] = {}  # buffer address -> (file, key, header entry, start, buffer, transposed)
        # Memory written once is used again: a buffer of each (shape, dtype) that no initializer being written
        # holds any more, and one read buffer. Fresh memory per tensor (page faults, then unmapping) took longer
        # than reading and casting the tensor (at 3B widths, 2 layers: 11.5 s of 4.5 GB written).
        self._free: dict[tuple, list] = defaultdict(list)
        self._read_buf = None

    def add(self, file, key: str, entry: dict, start: int, buf, transposed: bool) -> None:
        self.entries[buf.data_ptr()] = (file, key, entry, start, buf, transposed)

    def find(self, address: int):
        """(buffer address, entry) of the stand-in whose buffer holds `address`, or None."""
        for base, e in self.entries.items():
            if base <= address < base + e[4].numel() * e[4].element_size():
                return base, e
        return None

    def view(self, base: int, shape, strides, offset: int):
        """The real values behind the stand-in at `base` (the checkpoint tensor cast, and transposed, as
        `materialise` lays it out) seen through `as_strided(shape, strides, offset)`, contiguous, in memory of
        the pool: its buffer is used for the next tensor of the same shape once nothing holds the returned
        tensor (a finalizer gives it back), so the writer, one initializer at a time, touches one buffer per
        shape instead of fresh memory."""
        import weakref

        buf = self.entries[base][4]
        key = (tuple(buf.shape), buf.dtype)
        real = self._free[key].pop() if self._free[key] else buf.new_empty(buf.shape)
        self._fill(real, base)
        out = real.as_strided(shape, strides, offset)
        if not out.is_contiguous():  # a copy: the pooled buffer is free again at once
            out = out.contiguous()
            self._free[key].append(real)
            return out
        weakref.finalize(out, self._free[key].append, real)
        return out

    def _fill(self, real, base: int) -> None:
        import torch

        file, key, entry, start, buf, transposed = self.entries[base]
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if self._read_buf is None or self._read_buf.numel() < size:
            self._read_buf = None
            self._read_buf = torch.empty(size, dtype=torch.uint8)
        with open(file, "rb") as fh:
            tensor = _read(fh, entry, start, alloc=lambda shape, dtype: self._read_buf[:shape[0]])
        if transposed:
            copy_transposed(real, tensor)
        else:
            real.copy_(tensor)


def whole_model(source, hf_config, dtype: str = "float32"):
    """The whole model for the validation's reference pass, read tensor by tensor as a stage is: it holds the
    FP32 model and one tensor, where `from_pretrained` also kept the memory-mapped bf16 shards resident while
    it cast them (1.23x the FP32 bytes measured at 8 layers of 3B widths, against ~1.0x). Linear weights are
    contiguous here, as `from_pretrained` leaves them: the exporter's transposed buffers would send eager
    PyTorch through another GEMM path and move the reference's last bits. Parameters, buffers, ties and
    outputs equal `from_pretrained`'s (tests/test_streaming_paths.py)."""
    model = meta_model(source, hf_config, dtype)
    names = materialise(model, source, None, dtype, transposed=False)
    log.info("the whole model: %d tensors materialised from the checkpoint", len(names))
    return model


REFERENCES = ("auto", "resident", "streamed")
STREAM_REFERENCE_FROM = 4 << 30  # FP32 weight bytes from which validate.reference=auto streams the reference


def reference_kind(mode: str, parameters: int) -> str:
    """`resident` or `streamed` for validate.reference=`mode` (checked by the build) at `parameters`."""
    if mode == "auto":
        return "streamed" if parameters * 4 >= STREAM_REFERENCE_FROM else "resident"
    return mode


def reference_model(source, hf_config, dtype: str, kind: str):
    """The validation's PyTorch reference: whole_model (resident) or streamed_model."""
    return streamed_model(source, hf_config, dtype) if kind == "streamed" else whole_model(source, hf_config, dtype)


def streamed_model(source, hf_config, dtype: str = "float32"):
    """The whole model for the reference pass with its blocks (each element of its ModuleLists: decoder layers,
    ViT blocks, DeepStack mergers) read from the checkpoint just before their forward and released after it
    (LayerStream); everything else resident. Memory: the resident part (embedding table, patch embedding, norms,
    head) and one block, where whole_model holds all of it. Each block is read as whole_model reads it
    (contiguous, cast per tensor), so its outputs are whole_model's bit for bit; the cost is reading every
    block again on every forward (from the page cache after the first)."""
    model = meta_model(source, hf_config, dtype)
    stream = LayerStream(model, source, dtype)
    names = materialise(model, source, None, dtype, transposed=False, exclude=tuple(stream.blocks), index=stream.index)
    log.info("the reference model: %d tensors resident, %d blocks streamed from the checkpoint", len(names),
             len(stream.blocks))
    model._vlmforge_stream = stream
    return model


class LayerStream:
    """Hooks that materialise a block's parameters before its forward and put them back on meta after it.
    `overrides`: {parameter name: fill(out)}, values that replace the checkpoint's when a block is read, written
    into `out` (a buffer of the parameter's shape and the stream's dtype; the dequantized INT4 weights of the
    same-weight check). An overridden parameter is not read from the checkpoint."""

    def __init__(self, model, source, dtype: str) -> None:
        import torch

        self.model, self.source, self.dtype = model, source, dtype
        self.index = tensor_index(source)
        self.overrides: dict = {}
        self.blocks: dict[str, object] = {}
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.ModuleList) or any(name.startswith(b) for b in self.blocks):
                continue
            for i, block in enumerate(module):
                if any(True for _ in block.parameters()):
                    self.blocks[f"{name}.{i}."] = block
        self._live: dict[str, list[str]] = {}
        # what the progress line says when a block is read: "language_model.layers 13/36", "visual.blocks 4/32"
        lists = defaultdict(int)
        for prefix in self.blocks:
            lists[prefix.rstrip(".").rpartition(".")[0]] += 1
        self._notes = {}
        for prefix in self.blocks:
            owner, _, i = prefix.rstrip(".").rpartition(".")
            short = owner.removeprefix("model.")
            self._notes[prefix] = f"reading {short} {int(i) + 1}/{lists[owner]}"
        # Buffers handed back by released blocks, by (shape, dtype), taken again by the next block of the same
        # shapes (every decoder layer, every ViT block): a forward reads every block, and allocating each block's
        # weights afresh (page faults, then unmapping) took more time than reading and casting them. Holds one
        # block of each kind and its reads.
        self._pool: dict[tuple, list] = defaultdict(list)
        self._owned: set[int] = set()
        for prefix, block in self.blocks.items():
            block.register_forward_pre_hook(lambda mod, args, prefix=prefix: self.load(prefix))
            block.register_forward_hook(lambda mod, args, out, prefix=prefix: self.unload(prefix))

    def load(self, prefix: str) -> None:
        import torch

        if prefix in self._live:
            return
        progress.note(self._notes[prefix])
        reads: list = []
        overridden = tuple(n for n in self.overrides if n.startswith(prefix))
        names = materialise(self.model, self.source, (prefix,), self.dtype, transposed=False, index=self.index,
                            alloc=lambda shape, dtype: self._take(shape, dtype, reads), exclude=overridden)
        for r in reads:  # the checkpoint-dtype reads are done with once the block is cast
            self._give(r)
        target = getattr(torch, self.dtype)
        for n in overridden:  # not read from the checkpoint: computed into a buffer of the pool
            buf = self._take(tuple(self.model.get_parameter(n).shape), target, reads)
            self.overrides[n](buf)
            _set(self.model, n, torch.nn.Parameter(buf, requires_grad=False))
        self._live[prefix] = names + list(overridden)

    def unload(self, prefix: str) -> None:
        names = self._live.pop(prefix, None)
        if names:
            for n in names:
                self._give(self.model.get_parameter(n).data)
            release(self.model, names)

    def _take(self, shape, dtype, reads: list):
        import torch

        free = self._pool[(tuple(shape), dtype)]
        buf = free.pop() if free else torch.empty(tuple(shape), dtype=dtype)
        self._owned.add(buf.data_ptr())
        if dtype == torch.uint8:
            reads.append(buf)
        return buf

    def _give(self, tensor) -> None:
        if tensor.data_ptr() in self._owned:  # not given twice (tied names)
            self._owned.discard(tensor.data_ptr())
            self._pool[(tuple(tensor.shape), tensor.dtype)].append(tensor)

    @contextlib.contextmanager
    def resident(self, prefix: str):
        """One block's parameters materialised for the scope (read outside a forward)."""
        self.load(prefix)
        try:
            yield self.blocks[prefix]
        finally:
            self.unload(prefix)


def meta_model(source, hf_config, dtype: str = "float32"):
    """The model of `hf_config` (copied: construction writes into its config), parameters on meta."""
    import torch
    import transformers

    cls = getattr(transformers, source.family.hf_class)
    with _parameters_on_meta():
        model = cls._from_config(copy.deepcopy(hf_config), dtype=getattr(torch, dtype), attn_implementation="eager")
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered in the scope is replaced by a meta tensor of its shape and dtype, so its
    (never touched) CPU allocation is freed at once and initialisers run on nothing. Buffers stay real."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.detach().to("meta"),
                                                          requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def materialise(model, source, prefixes: tuple[str, ...] | None, dtype: str = "float32",
                transposed: bool = True, stand_ins: "StandIns | None" = None, exclude: tuple[str, ...] = (),
                index: dict | None = None, alloc=None) -> list[str]:
    """Read every parameter of `model` under `prefixes` (all of them when None) from the checkpoint's
    safetensors files, cast to `dtype`. Returns the parameter names set (aliases of tied ones included).
    `transposed`: Linear weights as transpose views of [in, out] buffers (for the exporter; see above).
    `exclude`: parameters all of whose names start with one of these are left as they are.
    `alloc(shape, dtype)`: where the (untransposed) values and the reads go, instead of new memory per tensor."""
    import torch

    from vlmforge.source import read_safetensors_header

    index = tensor_index(source) if index is None else index
    rename = source.family.checkpoint_name or (lambda n: n)
    groups: dict[int, list[str]] = defaultdict(list)
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
        params[name] = p
    wanted: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)  # file -> [(key, names)]
    for names in groups.values():
        if prefixes is not None and not any(n.startswith(tuple(prefixes)) for n in names):
            continue
        if exclude and all(n.startswith(exclude) for n in names):
            continue
        key = next((k for n in names for k in (n, rename(n)) if k in index), None)
        if key is None:
            raise CheckpointError(f"the checkpoint has no tensor for parameter {names[0]!r}"
                                  + (f" (looked for {sorted({rename(n) for n in names} | set(names))})"),
                                  where=str(source.path), fix="use the complete checkpoint this config belongs to")
        wanted[index[key]].append((key, names))
    target = getattr(torch, dtype)
    done: list[str] = []
    for file, items in sorted(wanted.items()):
        with open(file, "rb") as fh:
            header, start = read_safetensors_header(fh)
            for key, names in items:
                want = tuple(params[names[0]].shape)
                if stand_ins is not None and _numel(want) >= STAND_IN_MIN_ELEMENTS:
                    _check_shape(header[key], key, want, file)
                    is_t = transposed and len(want) == 2 and _linear_weight(model, names, prefixes)
                    buf = torch.empty(want[::-1] if is_t else want, dtype=target)  # reserved, never touched
                    stand_ins.add(file, key, header[key], start, buf, is_t)
                    param = torch.nn.Parameter(buf.t() if is_t else buf, requires_grad=False)
                    for n in names:
                        _set(model, n, param)
                    done += names
                    continue
                tensor = _read(fh, header[key], start, alloc)
                if tuple(tensor.shape) != want:
                    raise CheckpointError(f"tensor {key!r} has shape {list(tensor.shape)}, the model needs "
                                          f"{list(want)}", where=str(file),
                                          fix="use the config.json that came with these weights")
                if transposed and len(want) == 2 and _linear_weight(model, names, prefixes):
                    # Stored transposed ([in, out]) and handed over as its transpose view: the exporter folds
                    # the MatMul's Transpose(weight) into a view of this buffer, not a second copy (same bytes).
                    buf = torch.empty(want[::-1], dtype=target)
                    copy_transposed(buf, tensor)
                    param = torch.nn.Parameter(buf.t(), requires_grad=False)
                elif alloc is not None:
                    buf = alloc(want, target)
                    buf.copy_(tensor)
                    param = torch.nn.Parameter(buf, requires_grad=False)
                else:
                    param = torch.nn.Parameter(tensor.to(target), requires_grad=False)
                del tensor
                for n in names:
                    _set(model, n, param)
                done += names
    return done


TRANSPOSE_ROWS = 256


def copy_transposed(dst, src) -> None:
    """dst[:] = src.t() (and cast), in bands of TRANSPOSE_ROWS rows of `src`: torch's strided copy of a whole
    transposed matrix missed the cache on every element (the tied 151936 x 2048 head: 2.42 s, in bands 0.57 s)."""
    for j in range(0, src.shape[0], TRANSPOSE_ROWS):
        dst[:, j:j + TRANSPOSE_ROWS].copy_(src[j:j + TRANSPOSE_ROWS].t())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_shape(entry: dict, key: str, want: tuple, file) -> None:
    if tuple(entry["shape"]) != want:
        raise CheckpointError(f"tensor {key!r} has shape {list(entry['shape'])}, the model needs {list(want)}",
                              where=str(file), fix="use the config.json that came with these weights")
    if entry["dtype"] not in _DTYPES:
        raise CheckpointError(f"a tensor of dtype {entry['dtype']} (not a weight type vlmforge reads)",
                              where=str(file), fix="convert the checkpoint to float32/float16/bfloat16")


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read(fh, entry: dict, start: int, alloc=None):
    """One tensor read with plain file reads into memory of its own (or `alloc`'s). Not safetensors' memory map:
    the mapped pages of the checkpoint count in the resident set until the file is closed (measured at 3B widths:
    a whole shard, up to 1.9 GiB, on top of the stage's FP32 weights); read pages stay in the page cache only."""
    import torch

    begin, end = entry["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8) if alloc is None else alloc((end - begin,), torch.uint8)
    fh.seek(start + begin)
    if end > begin and fh.readinto(memoryview(buf.numpy())) != end - begin:
        raise CheckpointError("a tensor ends past the end of its file", where=str(fh.name),
                              fix="the checkpoint is truncated: download it again")
    if entry["dtype"] not in _DTYPES:
        raise CheckpointError(f"a tensor of dtype {entry['dtype']} (not a weight type vlmforge reads)",
                              where=str(fh.name), fix="convert the checkpoint to float32/float16/bfloat16")
    return buf.view(getattr(torch, _DTYPES[entry["dtype"]])).reshape(entry["shape"])


def _linear_weight(model, names: list[str], prefixes) -> bool:
    """Whether every name of the parameter the stage reads is the `weight` of an nn.Linear."""
    import torch

    mine = [n for n in names if prefixes is None or n.startswith(tuple(prefixes))]
    return all(n.endswith(".weight") and isinstance(model.get_submodule(n.rpartition(".")[0]), torch.nn.Linear)
               for n in mine)


def release(model, names: list[str]) -> None:
    """Put the named parameters back on meta: their memory is freed even if something still holds the model."""
    import torch

    for n in names:
        module_name, _, leaf = n.rpartition(".")
        module = model.get_submodule(module_name)
        p = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                      requires_grad=False)


def _set(model, name: str, param) -> None:
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = param


def tensor_index(source) -> dict:
    """{tensor name: safetensors file} over the checkpoint's weight files (checked by open_source)."""
    from safetensors import safe_open

    from vlmforge.source import checkpoint_file

    index: dict = {}
    for name in sorted(source.weight_files):
        file = checkpoint_file(source.path, name, f"checkpoint file {name}")
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key in index:
                    raise CheckpointError(f"tensor {key!r} is in both {index[key].name} and {name}",
                                          where=str(source.path),
                                          fix="use the checkpoint's own shards (one file per tensor)")
                index[key] = file
    return index
