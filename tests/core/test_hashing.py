"""core.hashing.sha256_file: the one file hash; never follows a symlinked last component."""

from __future__ import annotations

import hashlib
import os

import pytest

from vlmforge.core.errors import ArtifactError, CheckpointError
from vlmforge.core.hashing import sha256_file


def test_hash_of_a_regular_file(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 3_000_000)
    assert sha256_file(f) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert sha256_file(f, chunk=7) == sha256_file(f)


def test_a_symlinked_last_component_is_refused(tmp_path):
    (tmp_path / "real").write_bytes(b"data")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ArtifactError, match="symbolic link"):
        sha256_file(tmp_path / "link")
    with pytest.raises(CheckpointError):
        sha256_file(tmp_path / "link", error=CheckpointError)
    assert sha256_file((tmp_path / "link").resolve()) == hashlib.sha256(b"data").hexdigest()


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not a regular file"):
        sha256_file(tmp_path)
