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


def array_sha256(array) -> str:
    """Hex sha256 of a NumPy array's float32 bytes in C order (copied only if it is not already so): how an INT4
    transform names the FP32 weight each quantized one came from, and how the validation finds that weight in the
    PyTorch model (the [K, N] initializer of a Linear is its weight transposed)."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array, np.float32).data).hexdigest()
