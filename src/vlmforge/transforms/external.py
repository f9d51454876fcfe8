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
# The external "location" of a tensor whose bytes are not in any file yet: a checkpoint tensor a streamed export
# computes when it is read (StandInData). No file has this name (external_file refuses it), so such a reference can
# never be followed on disk.
STAND_IN_LOCATION = "<vlmforge stand-in>"
ALIGN = 4096  # tensors of 1 MiB and more start on a page boundary (mmap-friendly)
ALIGN_FROM = 1 << 20
_FIX = "the FP32 stage in the build cache is damaged: rebuild it with FORCE=1 (or `make clean`)"


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph with its external tensors left as references (small whatever the weights weigh)."""
    return onnx.load(str(path), load_external_data=False)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from vlmforge.transforms.graph import _tensors

    return [t for t in _tensors(model.graph) if uses_external_data(t)]


class StandInData:
    """Where the weights of a graph structure are while a streamed export transforms it before anything is written
    (exporters.onnx_export.export_module with a transform): tensor i's reference has location STAND_IN_LOCATION and
    offset i, and `makers[i]()` computes its values from the checkpoint (cast and laid out as the FP32 graph would
    hold them). Every function here that takes a graph's path (`src`) takes one of these instead: each tensor is
    computed when it is read and dropped after, as the FP32 data file would have been read one tensor at a time."""

    def __init__(self, makers: list, where: Path) -> None:
        self.makers, self.where = makers, Path(where)

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        info = ExternalDataInfo(t)
        if info.location != STAND_IN_LOCATION:
            raise ArtifactError(f"tensor {t.name!r} refers to {info.location!r}, not to the export's weights",
                                where=str(self.where), fix="this is a vlmforge bug: report it")
        array = self.makers[int(info.offset)]()
        if tuple(array.shape) != tuple(t.dims) or array.dtype != onnx.helper.tensor_dtype_to_np_dtype(t.data_type):
            raise ArtifactError(f"tensor {t.name!r}: the checkpoint gives {array.dtype}{list(array.shape)}, the graph "
                                f"declares {list(t.dims)}", where=str(self.where), fix="this is a vlmforge bug: report it")
        return array

    def __str__(self) -> str:
        return str(self.where)


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
                cast = fp16_clamped if t.name in fp32_to_fp16 else None
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
        out.write(cast(np.frombuffer(data, dtype=np.float32)).tobytes())


# The FP16 converter's clamping (onnxruntime.transformers.float16.convert_np_to_float16): nonzero magnitudes below
# 5.96e-8 become +-5.96e-8 (the smallest FP16 subnormal), finite ones above 65504 become +-65504; 0, NaN and +-inf
# stay. Its NumPy code takes four np.where passes and their temporaries per tensor (15 s of the 17 s FP16 transform of
# the 2.7 GB Qwen2.5-VL vision tower here). The same bits from one cast: a plain cast differs from the clamped one only
# where it gave +-0 for a nonzero value or +-inf for a finite one, and those few places are set to the clamped values
# (tests/transforms/test_cast_fp16.py compares the two at every edge).
_MIN_FP16, _MAX_FP16 = np.float32(5.96e-08), np.float32(65504.0)


def fp16_clamped(array: np.ndarray) -> np.ndarray:
    """float32 -> float16 exactly as the FP16 converter casts a weight: out-of-range values clamped, not flushed
    to zero or infinity."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    with np.errstate(over="ignore"):
        out = a.astype(np.float16)
    magnitude = out.view(np.uint16) & np.uint16(0x7FFF)
    where = np.flatnonzero((magnitude == 0) | (magnitude == 0x7C00))  # +-0 or +-inf after the cast
    if where.size:
        values = a.reshape(-1)[where]
        keep = (values != 0) & np.isfinite(values)
        where, values = where[keep], values[keep]
        clamped = np.where(np.abs(values) < 1, _MIN_FP16, _MAX_FP16)
        out.reshape(-1)[where] = np.copysign(clamped, values).astype(np.float16)
    return out


def save_structure(model: onnx.ModelProto, dst: Path) -> Path:
    """Save a graph whose large tensors already point into `<dst>.data` (the protobuf stays small). The
    caller normalises it first (exporters.onnx_export.normalize_model: transforms import exporters, never
    the other way round)."""
    onnx.save_model(model, str(dst))
    return Path(dst)


def initializer_bytes(model: onnx.ModelProto, src: Path) -> int:
    """Bytes of the main graph's initializers, inline or in `src`'s data files (what save_like_onnx compares
    with its threshold)."""
    return sum(_nbytes(t, src) for t in model.graph.initializer)


def save_like_onnx(model: onnx.ModelProto, src: Path, dst: Path, threshold: int, consume: bool = False) -> Path:
    """Write `model` to `dst` exactly as `exporters.onnx_export.save_model` would after loading every
    external tensor, without loading them: tensors whose bytes are still in `src`'s data files are read and
    written one at a time (a chunk at a time), tensors held in memory (`raw_data`) are written as they are.

    The layout is onnx's own (`onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True,
    size_threshold=1024)`): initializers in onnx's walk order, each at the end of `<dst>.data` with no padding,
    external when their bytes number at least 1024 - 33 (onnx compares `sys.getsizeof(raw_data)`), inline
    otherwise; every weight inline when the initializers together weigh `threshold` bytes or less.
    The caller normalises the model first (exporters.onnx_export.normalize_model), as save_model does.
    `consume`: `src`'s data files are the caller's scratch, read once: each tensor's bytes there are released
    (punch_hole) once copied, so the disk holds the graph's weights about once, not twice, while it is written."""
    from onnx.external_data_helper import _get_initializer_tensors  # the order onnx.save_model writes in

    dst = Path(dst)
    data_path = dst.with_name(dst.name + ".data")
    if data_path.exists():
        data_path.unlink()
    tensors = list(_get_initializer_tensors(model))
    total = initializer_bytes(model, src)  # save_model counts the main graph's
    if total <= threshold:  # small: everything inline, as onnx.save_model(model) writes it
        for t in external_tensors(model):
            _inline(t, src)
        onnx.save_model(model, str(dst))
        return dst
    for t in external_tensors(model):  # attribute tensors are never external in our graphs: inline them
        if not any(t is u for u in tensors):
            _inline(t, src)
    handles: dict[Path, object] = {}
    try:
        with open(data_path, "wb") as out:
            for t in tensors:
                size = _nbytes(t, src)
                external = uses_external_data(t)
                if not (external or t.HasField("raw_data")) or size + 33 < 1024:
                    if external:
                        _inline(t, src)
                    continue
                start = out.tell()
                if external and isinstance(src, StandInData):
                    out.write(np.ascontiguousarray(src.array(t)).data)
                elif external:
                    file, offset, _ = external_file(src, t)
                    fh = handles.get(file) or handles.setdefault(file, open(file, "rb+" if consume else "rb"))
                    fh.seek(offset)
                    _copy(fh, out, size, None, t.name, src)
                    if consume:
                        out.flush()
                        punch_hole(fh, offset, size)
                else:
                    out.write(t.raw_data)
                    t.ClearField("raw_data")
                _point_at(t, data_path.name, start, out.tell() - start)
    finally:
        for fh in handles.values():
            fh.close()
    onnx.save_model(model, str(dst))
    return dst


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fh, offset: int, length: int) -> bool:
    """Give a byte range of an open file back to the file system (Linux fallocate PUNCH_HOLE; the file keeps its
    size and reads zeros there). False where the call or the file system does not support it: nothing changes."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or length <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        return fallocate(fh.fileno(), _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0
    except (OSError, AttributeError):
        return False


def _nbytes(t: onnx.TensorProto, src: Path) -> int:
    """Bytes of a tensor's data: its raw_data, its external length, or element size x elements."""
    if uses_external_data(t) and not isinstance(src, StandInData):
        file, offset, length = external_file(src, t)
        return length if length is not None else file.stat().st_size - offset
    n = 1
    for d in t.dims:
        n *= d
    if t.HasField("raw_data"):  # from dims and type: reading `raw_data` copies the bytes (1.6 s per 8 INT4 layers)
        if t.data_type in _FOUR_BIT:
            return (n + 1) // 2
        if t.data_type == onnx.TensorProto.STRING:
            return len(t.raw_data)
    return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * n


_FOUR_BIT = {getattr(onnx.TensorProto, k) for k in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, k)}


def _inline(t: onnx.TensorProto, src: Path) -> None:
    """Read an external tensor's bytes into raw_data (as onnx.load(load_external_data=True) leaves it)."""
    if isinstance(src, StandInData):
        t.raw_data = np.ascontiguousarray(src.array(t)).tobytes()
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
        return
    file, offset, length = external_file(src, t)
    with open(file, "rb") as fh:
        fh.seek(offset)
        data = fh.read() if length is None else fh.read(length)
    if length is not None and len(data) != length:
        raise ArtifactError(f"external data of tensor {t.name!r} is truncated ({file.name})", where=str(src), fix=_FIX)
    t.raw_data = data
    t.data_location = onnx.TensorProto.DEFAULT
    del t.external_data[:]


def read_array(t: onnx.TensorProto, base: Path):
    """A tensor as a numpy array, its external bytes read (once, by offset) from the data file beside `base`,
    without changing the tensor (it stays a reference)."""
    from onnx import numpy_helper

    if not uses_external_data(t):
        return numpy_helper.to_array(t)
    if isinstance(base, StandInData):
        return base.array(t)
    file, offset, length = external_file(base, t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    n = 1
    for d in t.dims:
        n *= d
    count = n if length is None else length // dtype.itemsize
    with open(file, "rb") as fh:
        fh.seek(offset)
        data = np.fromfile(fh, dtype=dtype, count=count)
    if data.size != n:
        raise ArtifactError(f"external data of tensor {t.name!r} is truncated ({file.name})", where=str(base), fix=_FIX)
    return data.reshape(tuple(t.dims))
