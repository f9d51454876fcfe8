"""The release tarball: a deterministic `.tar.gz` (sorted entries, fixed mtime/uid/gid/owner names, zero gzip
timestamp: the same release gives the same bytes, so its sha256 is a stable release id), and `safe_extract`,
which refuses unsafe members and caps what it writes at the sizes the release's own manifest declares."""

from __future__ import annotations

import gzip
import json
import logging
import os
import tarfile
import zlib
from pathlib import Path

from vlmforge.artifact.manifest import MANIFEST, MAX_MANIFEST_BYTES
from vlmforge.core.workdirs import owner_tag
from vlmforge.core.errors import ArtifactError, from_os_error
from vlmforge.core.paths import is_safe_relative
from vlmforge.release.files import SUMS, release_files, remove_dead_work

log = logging.getLogger(__name__)

EXTRACT_SLACK = 16 << 20  # a release's card, SHA256SUMS and manifest beside the files its manifest lists
TAR_MTIME = 0  # every tar entry's mtime; with gzip mtime 0 the tarball depends on file contents only
GZIP_LEVEL = 6
_CHUNK = 1 << 20


def write_tarball(release: Path, out: Path) -> Path:
    """Deterministic `.tar.gz` of the release folder, entries under `<release name>/`; written atomically."""
    release, out = Path(release), Path(out)
    remove_dead_work(out.parent)
    tmp = str(out.parent / f".{out.name}.{owner_tag()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_tar_info(release.name + "/", tarfile.DIRTYPE, 0))
                    for rel in release_files(release) + [SUMS]:
                        path = release / rel
                        with open(path, "rb") as f:
                            tar.addfile(_tar_info(f"{release.name}/{rel}", tarfile.REGTYPE, path.stat().st_size), f)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        raise from_os_error(exc, "writing the release tarball", where=str(out),
                            needed=sum((release / r).stat().st_size for r in release_files(release))) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s", out)
    return out


def _tar_info(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a release tarball into `dest`, refusing absolute paths, `..`, links, special files, duplicate
    names and more than one top-level folder. Returns the extracted release folder.

    Nothing is written before every member header has been read and judged, and what is written is capped:
    each listed file at the size its manifest declares, the whole at the manifest's total plus
    EXTRACT_SLACK, counted while copying. A 4 MB tarball that inflates to gigabytes fails with nothing on
    disk beyond that cap."""
    archive = Path(archive)

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"unsafe or malformed release tarball: {what}", where=str(archive),
                             fix="only extract tarballs written by `vlmforge publish`; fetch the release again")

    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()  # headers only: the data is decompressed and skipped, not written
            top, files = _judge_members(members, bad)
            declared = _declared_sizes(tar, files, top, bad)
            cap, total = sum(declared.values()) + EXTRACT_SLACK, 0
            for rel, m in sorted(files.items()):  # judged in full before anything is written
                limit = declared.get(rel, EXTRACT_SLACK)
                total += m.size
                if m.size > limit or total > cap:
                    raise bad(f"member {m.name!r} is {m.size} bytes; its manifest allows {limit} "
                              f"({cap} bytes for the whole release)")
            root = Path(dest) / top
            root.mkdir()
            written = 0
            for rel, m in sorted(files.items()):
                written += _extract_member(tar, m, root / rel, min(m.size, cap - written))
            while tar.fileobj.read(_CHUNK):  # read to the gzip trailer so its CRC is checked too
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ArtifactError(f"{archive.name} is not a readable .tar.gz ({type(exc).__name__}: {exc})",
                            where=str(archive), fix="the tarball is damaged or truncated; fetch it again") from exc
    return root


def _judge_members(members, bad) -> tuple[str, dict]:
    """(the one top-level folder, {relative path: member} of its regular files); refuses anything else."""
    tops, files = set(), {}
    for m in members:
        name = m.name.rstrip("/")
        top, _, rel = name.partition("/")
        if not is_safe_relative(name) or not top:
            raise bad(f"member {m.name!r} is not a plain relative path (absolute, '..', or odd characters)")
        if not (m.isfile() or m.isdir()):
            raise bad(f"member {m.name!r} is a link or special file")
        tops.add(top)
        if m.isfile():
            if not rel:
                raise bad(f"member {m.name!r} is a file at the top level")
            if rel in files:
                raise bad(f"member {m.name!r} appears twice")
            files[rel] = m
    if len(tops) != 1:
        raise bad(f"expected one top-level folder, found {sorted(tops)[:5]}")
    return tops.pop(), files


def _declared_sizes(tar, files: dict, top: str, bad) -> dict[str, int]:
    """{path: bytes} the release's own manifest declares for its files (the manifest member is read, capped)."""
    m = files.get(MANIFEST)
    if m is None:
        raise bad(f"no {top}/{MANIFEST}")
    if m.size > MAX_MANIFEST_BYTES:
        raise bad(f"{MANIFEST} is {m.size} bytes")
    try:
        data = json.loads(tar.extractfile(m).read(MAX_MANIFEST_BYTES).decode("utf-8"))
        listed = {rel: int(v["bytes"]) for rel, v in data["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise bad(f"its {MANIFEST} does not list files with sizes ({type(exc).__name__})") from None
    return {**listed, MANIFEST: m.size}


def _extract_member(tar, member, dst: Path, limit: int) -> int:
    """Copy one member's data to a new regular file, never more than `limit` bytes; returns bytes written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(member)
    written = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(dst, flags, 0o644), "wb") as out:
        while written < limit and (block := src.read(min(_CHUNK, limit - written))):
            out.write(block)
            written += len(block)
    return written
