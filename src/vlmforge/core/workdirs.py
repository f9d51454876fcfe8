"""Temporary folders a process owns: named with `<host>-<pid>` so that a later run can tell a stale one (its
owner is dead, on this host) from a live one, and remove only what a dead vlmforge process left behind.
Used by the stage cache, the build's staging folders, publish and export-js."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """`<host>-<pid>`: names every temporary folder, so stale ones are told from live ones (same host)."""
    return f"{_host()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TAG = re.compile(r"(?:(?P<host>.+)-)?(?P<pid>\d+)")
def tag_is_stale(tag: str) -> bool:
    """`<host>-<pid>` (or the older bare `<pid>`) names a dead process on this host. Folders of other
    hosts (a shared filesystem under Slurm) are never judged: their owner may be alive over there."""
    m = _TAG.fullmatch(tag)
    if not m or m.group("host") not in (None, _host()):
        return False
    return not pid_alive(int(m.group("pid")))


def remove_stale(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Delete the entries of `folder` whose name matches `pattern` (group `tag`) and whose owner is dead."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and tag_is_stale(m.group("tag")):
            log.info("removing %s (left by an interrupted build)", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
