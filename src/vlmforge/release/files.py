"""What every part of a release agrees on: its reserved file names, the working files beside it, the list
of files it holds and their SHA256SUMS text."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vlmforge.artifact.manifest import RELEASE_FILES
from vlmforge.core.workdirs import remove_stale
from vlmforge.core.errors import ArtifactError
from vlmforge.core.hashing import sha256_file
from vlmforge.core.paths import scan_tree

SUMS, CARD = RELEASE_FILES
RESERVED = RELEASE_FILES
# Working files beside a release: `.<to>.publish-<host>-<pid>/` and `.<to>.tar.gz.<host>-<pid>.tmp`; those of
# dead publishes are removed by the next one (cache.remove_stale judges the owner).
WORK_FILES = (re.compile(r"^\..+\.publish-(?P<tag>[^/]+)$"), re.compile(r"^\..+\.tar\.gz\.(?P<tag>.+-\d+)\.tmp$"))


def remove_dead_work(folder: Path) -> None:
    for pattern in WORK_FILES:
        remove_stale(folder, pattern)


def tarball_path(release: Path) -> Path:
    release = Path(release)
    return release.with_name(release.name + ".tar.gz")


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def release_files(folder: Path) -> list[str]:
    """Relative posix paths of every regular file under `folder` but SHA256SUMS, sorted."""
    files, odd = scan_tree(folder)
    if odd:
        raise ArtifactError(f"{odd[0]} is a link or special file", where=str(Path(folder) / odd[0]),
                            fix="a release holds regular files only; rebuild or re-publish it")
    for rel in files:
        if any(c in rel for c in "\n\\"):
            raise ArtifactError(f"file name {rel!r} cannot be listed in {SUMS}", where=str(Path(folder) / rel),
                                fix="rename the file; names with newlines or backslashes are not supported")
    return [rel for rel in files if rel != SUMS]


def sha256sums(folder: Path) -> str:
    """`sha256sum`-format text (`<hex>  <path>`, sorted) covering every file in `folder` but SHA256SUMS."""
    return "".join(f"{sha256_file(folder / rel)}  {rel}\n" for rel in release_files(folder))
