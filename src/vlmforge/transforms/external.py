"""Transforms of graphs whose weights live in external data, without a whole-model protobuf.

Why: protobuf cannot serialise a message over 2 GiB, and `onnx.shape_inference.infer_shapes(model)` and
the FP16 converter's own inference serialise the model they are given. A Qwen-VL vision tower is 2.7 GB
as FP32, so every FP16 transform of it failed with `EncodeError`. The graph *structure* (nodes, inline
constants, references to the external bytes) is a few MB: the transforms run on that, and the external
tensors are then streamed from the source `.onnx.data` to the destination, converted on the way where the
transform changed their type, a chunk at a time (memory: one chunk, not one model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from vlmforge.core.errors import ArtifactError

CHUNK_BYTES = 64 << 20
ALIGN = 4096  # tensors of 1 MiB and more start on a page boundary (mmap-friendly)
ALIGN_FROM = 1 << 20
_FIX = "the FP32 stage in the build cache is damaged: rebuild it with FORCE=1 (or `make clean`)"


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph with its external tensors left as references (small whatever the weights weigh)."""
    return onnx.load(str(path), load_external_data=False)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from vlmforge.transforms.graph import _tensors

    return [t for t in _tensors(model.graph) if uses_external_data(t)]


def external_file(path: Path, tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
    """(file, offset, length) of `tensor`'s bytes; the file must be a plain file in the graph's own folder."""
    info = ExternalDataInfo(tensor)
    base = Path(path).parent.resolve()
    file = (base / info.location).resolve()
    if file.parent != base or not file.is_file():
        raise ArtifactError(f"external data {info.location!r} of tensor {tensor.name!r} is not a file in {base}",
                            where=str(path), fix=_FIX)
    return file, int(info.offset or 0), (int(info.length) if info.length else None)


def stream_external(model: onnx.ModelProto, src: Path, dst: Path, fp32_to_fp16: set[str]) -> int:
    """Write every external tensor of `model` (as read from `src`'s data file) into `<dst>.data`, casting
    the ones named in `fp32_to_fp16` from FP32 to FP16 with the converter's own clamping; point each tensor
    at its new place. Returns the bytes written."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    data_path = Path(dst).with_name(Path(dst).name + ".data")
    handles: dict[Path, object] = {}
    written = 0
    try:
        with open(data_path, "wb") as out:
            for t in external_tensors(model):
                file, offset, length = external_file(src, t)
                fh = handles.get(file) or handles.setdefault(file, open(file, "rb"))
                length = length if length is not None else file.stat().st_size - offset
                if length >= ALIGN_FROM and out.tell() % ALIGN:
                    out.write(b"\0" * (ALIGN - out.tell() % ALIGN))
                start = out.tell()
                fh.seek(offset)
                cast = convert_np_to_float16 if t.name in fp32_to_fp16 else None
                _copy(fh, out, length, cast, t.name, src)
                _point_at(t, data_path.name, start, out.tell() - start)
            written = out.tell()
    finally:
        for fh in handles.values():
            fh.close()
    return written


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Set a tensor's external reference (onnx's `set_external_data` insists on raw_data being present)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _copy(fh, out, length: int, cast, name: str, src: Path) -> None:
    """Copy `length` bytes from `fh` to `out` in chunks, through `cast` (FP32 -> FP16) when given."""
    left = length
    while left:
        data = fh.read(min(CHUNK_BYTES, left))
        if not data:
            raise ArtifactError(f"external data of tensor {name!r} is truncated", where=str(src), fix=_FIX)
        left -= len(data)
        if cast is None:
            out.write(data)
            continue
        if len(data) % 4:
            raise ArtifactError(f"tensor {name!r} is FP32 but holds {length} bytes", where=str(src), fix=_FIX)
        out.write(cast(np.frombuffer(data, dtype=np.float32)).astype(np.float16).tobytes())


def save_structure(model: onnx.ModelProto, dst: Path) -> Path:
    """Save a graph whose large tensors already point into `<dst>.data` (the protobuf stays small)."""
    from vlmforge.exporters.onnx_export import normalize_model

    normalize_model(model)
    onnx.save_model(model, str(dst))
    return Path(dst)
