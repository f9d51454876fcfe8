"""User-facing errors: every one says what failed, where, and how to fix it.

The CLI catches `VlmforgeError` and prints `str(err)` without a traceback; anything else is a bug.
"""

from __future__ import annotations


class VlmforgeError(Exception):
    """An error caused by input the user controls (recipe, checkpoint, artifact, image...)."""

    kind = "VlmforgeError"

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.kind}: {self.what}"]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


class RecipeError(VlmforgeError):
    kind = "RecipeError"


class CheckpointError(VlmforgeError):
    kind = "CheckpointError"


class ExportError(VlmforgeError):
    kind = "ExportError"


class ContractError(VlmforgeError):
    kind = "ContractError"


class ValidationFailed(VlmforgeError):
    kind = "ValidationFailed"


class ArtifactError(VlmforgeError):
    kind = "ArtifactError"


class InputError(VlmforgeError):
    kind = "InputError"


class FileSystemError(VlmforgeError):
    """The machine refused a write or read: disk full, read-only, permissions, a file in the way."""

    kind = "FileSystemError"


def _free_bytes(path: str) -> int | None:
    import os
    import shutil

    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p or "/").free
    except OSError:
        return None


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def from_os_error(exc: OSError, doing: str, where: str = "", needed: int | None = None) -> FileSystemError:
    """One error paragraph for an OSError met while `doing` something: what the system said, which path,
    and the fix for that kind of failure (free space with the amount needed, a writable folder, ...)."""
    import errno

    path = where or exc.filename or ""
    reason = exc.strerror or str(exc)
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path) if path else None
        amount = f"about {human_bytes(needed)} is needed" if needed else "more space is needed"
        have = f", {human_bytes(free)} is free there now" if free is not None else ""
        return FileSystemError(f"no space left on the device while {doing} ({reason})", where=path,
                               fix=f"free space on the file system holding {path or 'the output folder'} "
                                   f"({amount}{have}), or point out_dir/cache_dir elsewhere")
    if code == errno.EROFS:
        fix = "choose a folder on a writable file system (out_dir=..., cache_dir=..., --to ...)"
    elif code in (errno.EACCES, errno.EPERM):
        fix = "choose a folder you may write to, or fix its permissions"
    elif code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        fix = "a file or folder is in the way: choose another path, or move it away yourself"
    elif code == errno.ENOENT:
        fix = "check that the path exists"
    else:
        fix = "check the path and the file system"
    return FileSystemError(f"{reason} while {doing}", where=path, fix=fix)


def as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, one in its cause chain, or one a native library reports only in its
    message (safetensors' Rust errors end in "(os error 28)")."""
    import os
    import re

    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        m = re.search(r"\(os error (\d+)\)", str(seen))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


class ResourceError(VlmforgeError):
    """The machine cannot hold the build (memory or disk), found before any work starts."""

    kind = "ResourceError"
