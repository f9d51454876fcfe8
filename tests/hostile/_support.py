"""What every hostile case asserts, and the pieces to make hostile input from a good artifact set.

A case runs a `vlmforge` sub-command in process (the same `cli.main` the entry point runs) on input made
to hurt: it must end with the expected exit code, one error paragraph on stderr and no traceback, and the
sentinel tree beside the input (files the tool must never read into a set, change or delete) must be
byte-for-byte what it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import RECIPES

KINDS = ("RecipeError", "CheckpointError", "ExportError", "ContractError", "ValidationFailed", "ArtifactError",
         "InputError", "FileSystemError")
SECRET = b"sentinel: this must never be read into an artifact set or a release\n"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from vlmforge.cli import main

    code = main(["--recipes", str(RECIPES), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(result, *needles: str, code: int = 2) -> str:
    """Exit `code`, one `<Kind>: what / where: / fix:` paragraph on stderr, no traceback; returns stderr."""
    got, out, err = result
    assert got == code, (got, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    if code == 2:
        heads = [line for line in err.splitlines() if line.split(":", 1)[0] in KINDS]
        assert len(heads) == 1, err
        assert "  where: " in err and "  fix:   " in err, err
    for n in needles:
        assert n in err + out, (n, err, out)
    return err


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: what it is} for everything under root, links not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


class Sentinel:
    """A tree of files outside every folder the tool is asked to work in, hashed before and after."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sub").mkdir(parents=True)
        self.secret = root / "secret.txt"
        self.secret.write_bytes(SECRET)
        (root / "victim.bin").write_bytes(os.urandom(4096))
        (root / "sub" / "notes.md").write_text("user's notes\n")
        self.before = snapshot(root)

    def sha(self, name: str) -> str:
        return hashlib.sha256((self.root / name).read_bytes()).hexdigest()

    def assert_untouched(self) -> None:
        assert snapshot(self.root) == self.before


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def write_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def rehash(d: Path) -> None:
    """Re-describe every listed file as it is now: what an attacker who controls the whole set does."""
    m = manifest(d)
    for rel in m["files"]:
        data = (d / rel).read_bytes()
        m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(d, m)


def list_outside(d: Path, key: str, target: Path) -> None:
    """Add `key` (a path meant to reach `target`) to the manifest with `target`'s true hash and size."""
    m = manifest(d)
    data = target.read_bytes()
    m["files"][key] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(d, m)


def manifests_under(root: Path) -> list[Path]:
    return sorted(root.rglob("manifest.json")) if root.exists() else []


def no_bytes_of(root: Path, needle: bytes) -> bool:
    return not any(needle in p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def small_fs(path: Path, size: str = "1m", readonly: bool = False):
    """A tmpfs of `size` mounted at `path` (root only: the machine's own filesystem cannot be filled here)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(8) to make a small or read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)
