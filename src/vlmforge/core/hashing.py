"""sha256 of a file: one definition for the stage cache, the manifest, the fixtures, the repro check and the
release (SHA256SUMS, the tarball digest).

Streams in 1 MiB blocks, so a multi-GB external-data file is hashed without being read into memory. Opens
with O_NOFOLLOW (`core.paths.open_regular`): a symlink at the last component, or anything but a regular file,
is refused, never followed. Callers hashing files a checkpoint may hold as links (an HF cache snapshot) pass
the resolved path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vlmforge.core.errors import ArtifactError, VlmforgeError
from vlmforge.core.paths import open_regular

CHUNK = 1 << 20


def sha256_file(path: Path, chunk: int = CHUNK, error: type[VlmforgeError] = ArtifactError) -> str:
    """Hex sha256 of the bytes of the regular file `path` (a symlinked last component is refused)."""
    h = hashlib.sha256()
    with open_regular(Path(path), error=error) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: Path) -> list[int]:
    """[size, mtime_ns, inode] of a file (not followed): equal stamps, the file was not rewritten or replaced
    since it was hashed."""
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


FINGERPRINT_GRID = 256  # rows and columns of a matrix an array_fingerprint reads (at most)


def array_fingerprint(array) -> str:
    """Which weight an INT4 transform quantized, as the validation finds it in the PyTorch model (the [K, N]
    initializer of a Linear is its weight transposed): the hex sha256 of the array's shape and of its float32
    values on a grid of at most 256 evenly spaced rows by 256 columns, both ends included (every value of a smaller
    matrix). Hashing every FP32 byte (12 GB at Qwen2.5-VL-3B widths) was the INT4 decoder export's slowest step on
    a 2-core box; weights of one shape never agree on 65,536 spread values unless they are the same weights, and
    a wrong match could not pass anyway: the validation measures each dequantized weight against the PyTorch
    weight it matched, in quantization steps (validators.same_weights.load_into)."""
    import numpy as np

    a = np.asarray(array)
    if a.ndim != 2:
        a = a.reshape(1, -1) if a.ndim < 2 else a.reshape(a.shape[0], int(np.prod(a.shape[1:])))
    rows, cols = (np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_GRID)).round().astype(np.int64)) for n in a.shape)
    sample = np.ascontiguousarray(a[np.ix_(rows, cols)], np.float32)
    h = hashlib.sha256("x".join(str(int(d)) for d in np.shape(array)).encode() + b":")
    h.update(sample.data)
    return h.hexdigest()
