"""Publish a verified artifact set as a release: a folder + a byte-reproducible tarball (+ optional hub push).

    vlmforge publish artifacts/tiny-qwen2_5_vl/fp32-392 --to releases/tiny-qwen2_5_vl-fp32-392
    vlmforge verify releases/tiny-qwen2_5_vl-fp32-392.tar.gz

A release folder holds the artifact files, `manifest.json`, a model card `README.md` generated from the
manifest (`release.card`), and `SHA256SUMS` (checkable with `sha256sum -c SHA256SUMS` from inside the folder,
covering every file but itself). It is assembled in a hidden staging folder and renamed into place, so an
interrupted publish never leaves anything at `to` that looks complete. The tarball `<to>.tar.gz`
(`release.tarball`) is byte-reproducible, so its sha256 is a stable release id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from vlmforge.artifact.manifest import MANIFEST, read_manifest, verify_dir
from vlmforge.core.workdirs import owner_tag
from vlmforge.core.errors import ArtifactError, from_os_error
from vlmforge.core.hashing import CHUNK
from vlmforge.core.paths import confine, open_regular
from vlmforge.release.card import model_card
from vlmforge.release.files import CARD, RESERVED, SUMS, remove_dead_work, sha256sums, tarball_path, write_text
from vlmforge.release.hub import check_hub_reachable, push_to_hub
from vlmforge.release.tarball import write_tarball
from vlmforge.release.verify import verify_release

log = logging.getLogger(__name__)


def publish(directory: Path, to: Path, *, tarball: bool = True, hub_repo: str | None = None,
            hub_revision: str | None = None) -> Path:
    """Verify `directory`, write the release folder `to` (and `<to>.tar.gz`), optionally push it to the hub.

    Returns the release folder. Publishing again to the same `to` is a no-op for an identical release
    (the tarball is rewritten, to the same bytes); anything else already at `to` is an error.
    """
    directory, to = Path(directory), Path(to)
    _check_source(directory)
    _check_target(directory, to)
    if hub_repo:
        check_hub_reachable(hub_repo)
    manifest = read_manifest(directory)
    staging = to.parent / f".{to.name}.publish-{owner_tag()}"
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_work(to.parent)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        _stage_release(directory, manifest, staging, to.name)
        if _same_release(staging, to):
            log.info("%s already holds this release", to)
            shutil.rmtree(staging)
        else:
            _check_target(directory, to)  # nothing appeared at `to` while we were staging
            os.rename(staging, to)
    except OSError as exc:
        raise from_os_error(exc, "writing the release folder", where=str(to.parent),
                            needed=sum(f["bytes"] for f in manifest["files"].values())) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("published %s", to)
    if tarball:
        write_tarball(to, tarball_path(to))
    if hub_repo:
        push_to_hub(to, hub_repo, hub_revision)
    return to


def _check_source(directory: Path) -> None:
    report = verify_dir(directory)  # raises ArtifactError when there is no valid manifest
    if not report.ok:
        raise ArtifactError(
            f"refusing to publish an artifact set that does not verify: {'; '.join(report.lines())}",
            where=str(directory),
            fix="rebuild it with `vlmforge export ...` (a set whose validation failed is never published)",
        )
    clash = [name for name in RESERVED if (directory / name).exists()]
    if clash:
        raise ArtifactError(f"the artifact set contains {clash}, names a release writes itself", where=str(directory),
                            fix="rebuild the artifact set; vlmforge builds never write these files")


def _check_target(directory: Path, to: Path) -> None:
    src, dst = directory.resolve(), to.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ArtifactError("the release folder must lie outside the artifact set (and not contain it)",
                            where=str(to), fix="pass --to a folder beside the artifact set, e.g. releases/<name>")
    if to.is_dir() and any(to.iterdir()) and not (to / SUMS).is_file():
        raise ArtifactError(f"{to} exists, is not empty and is not a vlmforge release", where=str(to),
                            fix="choose another --to or remove that folder")
    if to.exists() and not to.is_dir():
        raise ArtifactError(f"{to} exists and is not a folder", where=str(to), fix="choose another --to")
    tar = tarball_path(to)
    if tar.exists() and not to.exists():
        raise ArtifactError(f"{tar.name} exists but its release folder {to.name} does not", where=str(tar),
                            fix="remove the stale tarball or choose another --to")


def _same_release(staging: Path, to: Path) -> bool:
    """`to` already holds exactly the release in `staging` (same SHA256SUMS and it verifies)."""
    if not (to / SUMS).is_file():
        if to.is_dir() and not any(to.iterdir()):
            to.rmdir()  # an empty folder is as good as none
        return False
    if (to / SUMS).read_bytes() != (staging / SUMS).read_bytes():
        raise ArtifactError(f"{to} already holds a different release", where=str(to),
                            fix="choose another --to, or remove the old release (and its .tar.gz) first")
    report = verify_release(to)
    if not report.ok:
        raise ArtifactError(f"{to} holds this release but it is damaged: {'; '.join(report.lines())}",
                            where=str(to), fix="remove it and publish again")
    return True


def _stage_release(directory: Path, manifest: dict, staging: Path, name: str) -> None:
    """Copy every listed file (re-hashing while copying: a file changed after verification is caught),
    then write the model card and SHA256SUMS."""
    where = str(directory / MANIFEST)
    for rel, want in sorted(manifest["files"].items()):
        got = _copy_hashed(confine(directory, rel, where=where), confine(staging, rel, where=where))
        if got != want["sha256"]:
            raise ArtifactError(f"{rel} changed while it was being published", where=str(directory / rel),
                                fix="do not modify an artifact set while publishing it; publish again")
    shutil.copyfile(directory / MANIFEST, staging / MANIFEST)
    has_genai = "genai_config.json" in manifest["files"]
    write_text(staging / CARD, model_card(manifest, name, has_genai=has_genai))
    write_text(staging / SUMS, sha256sums(staging))


def _copy_hashed(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with open_regular(src) as fin, os.fdopen(os.open(dst, flags, 0o644), "wb") as fout:
        while block := fin.read(CHUNK):
            h.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o644)
    return h.hexdigest()
