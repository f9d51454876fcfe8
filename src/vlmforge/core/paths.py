"""The one confinement function, and the helpers that read a tree without following links out of it.

Every path that comes from data (a manifest's `files` keys, a recipe's `name`, a checkpoint's tokenizer
files, a SHA256SUMS line) goes through `confine` before anything opens, stats, copies or deletes it. A
hostile artifact set run through `verify`/`publish`/`validate` as root in CI must not make vlmforge read,
write or truncate anything outside the set, and must not even answer "does this file exist?" about paths
outside it — so a bad path is refused before any file-system call on it.

The rules (what a security reviewer of tar or pip expects):
* a relative path is a `/`-separated list of components; every component starts with a letter, a digit or
  `_` and holds only `[A-Za-z0-9._+-]`: no absolute paths, no `..`/`.`, no hidden files, no backslashes,
  no NUL, no drive letters, no empty components, at most `MAX_PATH` characters;
* after resolving every symlink, the path must lie inside the root (or inside one of the extra roots the
  caller names, e.g. an HF cache's `blobs/` folder behind a snapshot's links);
* files are opened with O_NOFOLLOW and must be regular files (`open_regular`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path, PurePosixPath

from vlmforge.core.errors import ArtifactError, VlmforgeError

COMPONENT = r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}"
RELATIVE_PATH = re.compile(rf"^{COMPONENT}(/{COMPONENT})*$")  # also the manifest schema's pattern for files keys
NAME = re.compile(rf"^{COMPONENT}$")
MAX_PATH = 1024


def is_safe_relative(rel) -> bool:
    """True for a relative, normalised path that `confine` accepts before resolution."""
    return isinstance(rel, str) and len(rel) <= MAX_PATH and RELATIVE_PATH.fullmatch(rel) is not None


def check_name(name: str, what: str, where: str, error: type[VlmforgeError] = ArtifactError,
               fix: str = "use letters, digits, '.', '_', '+' or '-', starting with a letter or digit") -> str:
    """A single path component (a recipe's artifact name, a model name): no separators, no `.`/`..`."""
    if not isinstance(name, str) or NAME.fullmatch(name) is None:
        raise error(f"{what} {name!r} is not a plain folder name", where=where, fix=fix)
    return name


def is_inside(path: Path, root: Path) -> bool:
    """`path` equals `root` or lies below it (both taken as given: resolve them first)."""
    return path == root or root in path.parents


def check_relative(rel: str, root: Path, *, where: str, error: type[VlmforgeError] = ArtifactError,
                   fix: str = "artifact sets list plain relative paths of regular files; rebuild the artifact set") -> str:
    """The first half of `confine`, touching no file system: `rel` is a plain relative path."""
    if not is_safe_relative(rel):
        raise error(f"path {rel!r} is not a plain relative path inside {root}", where=where, fix=fix)
    return rel


def confine(root: Path, rel: str, *, where: str, also: tuple[Path, ...] = (),
            error: type[VlmforgeError] = ArtifactError,
            fix: str = "artifact sets list plain relative paths of regular files; rebuild the artifact set") -> Path:
    """`root/rel` with every symlink resolved, refused unless it stays inside `root` (or one of `also`).

    The check of `rel` itself comes first and touches no file system: a path that is absolute, has `..`
    or odd characters is refused without looking at what it names."""
    check_relative(rel, root, where=where, error=error, fix=fix)
    base = Path(root).resolve()
    path = (base / PurePosixPath(rel)).resolve()
    roots = (base, *(Path(r).resolve() for r in also))
    if not any(is_inside(path, r) for r in roots):
        raise error(f"{rel} resolves to {path}, outside {base} (a symbolic link?)", where=str(base / rel),
                    fix="replace the link by the file itself, or rebuild the set")
    return path


def open_regular(path: Path, where: str = "", error: type[VlmforgeError] = ArtifactError):
    """Open `path` for reading without following a final symlink; refuse anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{path} is a symbolic link", where=where or str(path),
                        fix="replace the link by the file itself") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path} is not a regular file", where=where or str(path), fix="replace it by a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def scan_tree(root: Path) -> tuple[list[str], list[str]]:
    """(regular files, everything else that is not a folder) under `root`, as sorted relative posix paths.

    Links are never followed: a symlink to a folder is reported as one entry, not walked into."""
    files, odd = [], []
    base = Path(root)
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():
                dirnames.remove(name)
                odd.append((here / name).relative_to(base).as_posix())
        for name in filenames:
            p = here / name
            rel = p.relative_to(base).as_posix()
            (files if stat.S_ISREG(os.lstat(p).st_mode) else odd).append(rel)
    return sorted(files), sorted(odd)


def make_dir(path: Path, what: str, key: str) -> Path:
    """mkdir -p, with one clear error when a file is in the way or the file system refuses."""
    from vlmforge.core.errors import from_os_error

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise from_os_error(exc, f"creating {what} (recipe key {key})", where=str(path)) from None
    return Path(path)
