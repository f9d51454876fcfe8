"""sha256 of a file: one definition for the stage cache, the manifest, the fixtures and the repro check.

Streams in 1 MiB blocks, so a multi-GB external-data file is hashed without being read into memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of the bytes of `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
