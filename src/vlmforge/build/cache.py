"""Content-addressed cache of stage outputs and validation results.

    <cache_dir>/stages/<family>/<stage>/<key>/              FP32 export of a stage (<stage>.onnx [+ .data])
    <cache_dir>/stages/<family>/<stage>.<precision>/<key>/  that export after a transform (fp16, int4)
    <cache_dir>/stages/<family>/validation/<key>/           the checks of one artifact set (passing only)

Each entry is a folder of files plus `entry.json`: the key, the inputs the key was made of (so "why did
this rebuild?" is a diff away), sha256 and size of every file, a record (contract, transform record, ...)
and a digest over all of that. An entry appears only by renaming a complete temporary folder into place,
so a build killed mid-write leaves at most a `.tmp-*` folder that nothing ever reads (and the next build
removes once its owner is dead). An entry whose files or record no longer match is logged as corrupted,
deleted and rebuilt: never used. Entries are guarded by an flock per key, so parallel matrix jobs that
need the same stage build it once and the others wait for it.

What a key is made of is the build plan's business (vlmforge.build.plan): this module stores and verifies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from vlmforge.core.errors import ArtifactError
from vlmforge.core.hashing import file_stamp, sha256_file
from vlmforge.core.workdirs import _host, owner_tag, pid_alive, remove_stale, tag_is_stale  # noqa: F401

log = logging.getLogger(__name__)

ENTRY = "entry.json"
FORMAT = 1


def digest(data) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -- entries ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    path: Path
    key: str
    files: dict  # name -> {"sha256", "bytes"}
    record: dict = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.key[:12]

    def materialize(self, dst: Path, link: bool = False, stop=None) -> dict[str, dict]:
        """Copy the entry's files into `dst`; returns {name: {"sha256", "bytes", "stat"}} of the copies, hashed
        while they were written (and checked against the entry: a copy that differs is an error), with the
        copy's (size, mtime_ns, inode) for a later reader to tell the file is still the one hashed.
        `link=True` hardlinks where it can: only for scratch folders nobody edits (a hardlinked artifact file
        edited by a user would change the cache entry too, and onnx refuses external data with several
        links); linked files are not hashed again (empty result for them). `stop` (a threading.Event): set,
        the copy gives up between chunks (raises CopyStopped)."""
        dst.mkdir(parents=True, exist_ok=True)
        out_files: dict[str, dict] = {}
        for name in self.files:
            src, out = self.path / name, dst / name
            if out.exists():
                out.unlink()
            if link:
                try:
                    os.link(src, out)
                    continue
                except OSError:
                    pass
            sha = _copy_hashed(src, out, stop)
            os.chmod(out, 0o644)
            if sha != self.files[name]["sha256"]:
                raise ArtifactError(f"the copy of {name} differs from its cache entry (sha256 {sha[:12]}, the "
                                    f"entry says {self.files[name]['sha256'][:12]})", where=str(src),
                                    fix="the cache entry changed while it was copied: build again (FORCE=1 rebuilds)")
            stamp = file_stamp(out)
            out_files[name] = {"sha256": sha, "bytes": stamp[0], "stat": stamp}
        return out_files


COPY_CHUNK = 8 << 20


class CopyStopped(Exception):
    """A background copy was told to stop (the build is failing or was interrupted)."""


def _copy_hashed(src: Path, out: Path, stop=None) -> str:
    """Copy `src` (a regular file, never followed) to a new file `out`, chunk by chunk; the sha256 of the bytes
    written. hashlib and the file writes release the GIL, so a copy in a thread runs beside the next stage."""
    from vlmforge.core.paths import open_regular

    h = hashlib.sha256()
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    with open_regular(src) as fi, open(out, "xb") as fo:
        while n := fi.readinto(view):
            if stop is not None and stop.is_set():
                raise CopyStopped(str(src))
            h.update(view[:n])
            fo.write(view[:n])
    return h.hexdigest()


class Corrupted(Exception):
    pass


CACHE_TEMP = re.compile(r"^\.(?:tmp|trash)-[0-9a-f]{12}-(?P<tag>.+)$")


class StageCache:
    def __init__(self, cache_dir: Path, force: bool = False) -> None:
        self.root = Path(cache_dir) / "stages"
        self.force = force

    def slot(self, family: str, name: str) -> Path:
        return self.root / family / name

    @contextlib.contextmanager
    def locked(self, family: str, name: str, key: str) -> Iterator[None]:
        """Exclusive per-key lock (flock: released by the kernel if the holder dies, even by SIGKILL)."""
        slot = self.slot(family, name)
        slot.mkdir(parents=True, exist_ok=True)
        with open(slot / f".{key}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def lookup(self, family: str, name: str, key: str) -> Entry | None:
        """The verified entry, or None. A corrupted entry is deleted. Call under `locked`."""
        path = self.slot(family, name) / key
        if self.force or not path.exists():
            return None
        try:
            return read_entry(path, key)
        except Corrupted as why:
            log.warning("%s: cache entry %s is corrupted (%s); deleting it and rebuilding", name, path, why)
            self.evict(family, name, key)
            return None

    def evict(self, family: str, name: str, key: str) -> None:
        path = self.slot(family, name) / key
        if path.exists():
            trash = path.with_name(f".trash-{key[:12]}-{owner_tag()}")
            os.rename(path, trash)  # gone from view at once; then deleted
            shutil.rmtree(trash, ignore_errors=True)

    def put(self, family: str, name: str, key: str, inputs: dict, fill: Callable[[Path], dict]) -> Entry:
        """Run `fill(tmp_dir) -> record`, then publish tmp_dir as the entry (temp folder + rename). Call
        under `locked`; an existing entry (e.g. under --force) is replaced."""
        slot = self.slot(family, name)
        slot.mkdir(parents=True, exist_ok=True)
        remove_stale(slot, CACHE_TEMP)
        tmp = slot / f".tmp-{key[:12]}-{owner_tag()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            record = fill(tmp) or {}
            files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            body = {"format": FORMAT, "key": key, "stage": name, "family": family, "inputs": inputs,
                    "files": files, "record": record}
            _write_json(tmp / ENTRY, {**body, "digest": digest(body)})
            self.evict(family, name, key)
            os.rename(tmp, slot / key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(slot / key, key, files, record)

    def get_or_build(self, family: str, name: str, key: str, inputs: dict,
                     fill: Callable[[Path], dict]) -> tuple[Entry, bool]:
        """(entry, True) from the cache, or (entry, False) after building it with `fill`."""
        with self.locked(family, name, key):
            remove_stale(self.slot(family, name), CACHE_TEMP)  # a killed build's leftovers, hit or miss
            entry = self.lookup(family, name, key)
            if entry is not None:
                return entry, True
            return self.put(family, name, key, inputs, fill), False


def read_entry(path: Path, key: str) -> Entry:
    try:
        data = json.loads((path / ENTRY).read_text())
    except FileNotFoundError:
        raise Corrupted(f"no {ENTRY}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Corrupted(f"{ENTRY} is not JSON ({exc})") from None
    body = {k: v for k, v in data.items() if k != "digest"} if isinstance(data, dict) else {}
    if not body or data.get("digest") != digest(body):
        raise Corrupted(f"{ENTRY} does not match its digest")
    if data.get("key") != key or data.get("format") != FORMAT:
        raise Corrupted("entry key or format differs from its folder")
    files = data["files"]
    present = {p.name for p in path.iterdir() if p.name != ENTRY}
    if present != set(files):
        raise Corrupted(f"files {sorted(present ^ set(files))} missing or not listed")
    for name, want in files.items():
        p = path / name
        if p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
            raise Corrupted(f"{name} was altered (sha256 differs)")
    return Entry(path, key, files, data.get("record") or {})


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
