"""Where a build writes and how a finished set appears: the artifact folder's name, the staging and scratch
working folders beside it, publishing by rename (manifest last), parking a failed set, and the build log.

A failed or interrupted build never leaves a directory that `vlmforge verify` accepts: until the final
rename the work lives in `.<name>.staging-<host>-<pid>` (no manifest there, ever); the manifest is written
into the published directory after the rename, atomically; a build whose checks fail is moved to
`<name>.failed/` without a manifest (its `validation.json` says what failed). The next build removes the
working folders of dead builds (their stages stay in the stage cache, vlmforge.build.cache).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from vlmforge.artifact.manifest import MANIFEST, write_manifest
from vlmforge.build.cache import owner_tag, remove_stale
from vlmforge.config import BuildConfig
from vlmforge.core.errors import RecipeError
from vlmforge.core.paths import check_name, make_dir
from vlmforge.host.sizes import size_label
from vlmforge.validators.results import CheckResult

# Working folders beside the artifact sets: `.<name>.<kind>-<host>-<pid>`.
WORK_DIR = re.compile(r"^\..+\.(?:staging|fp32|old)-(?P<tag>.+)$")
VALIDATION_FILE = "validation.json"
FAILED_MARKER = ".vlmforge-failed"  # written into `<name>.failed/`: the build only ever replaces its own
LOGS = "logs"  # beside the artifact sets of a model: per-build timings


def artifact_dir(cfg: BuildConfig, image_size, recipe: str = "recipe") -> Path:
    """`<out_dir>/<model.name>/<name>`. Both names are single plain folder names, so a set can only land
    inside out_dir, and never on the logs folder or a working folder."""
    suffix = "-nodeepstack" if cfg.model.deepstack == "drop" else ""
    fix = "use letters, digits, '.', '_', '+' or '-' (no '/', no leading '.'), e.g. name=fp32-392-test"
    model = check_name(cfg.model.name, "model.name", f"{recipe}: model.name", RecipeError, fix)
    size = "dynamic" if image_size is None else size_label(image_size)  # None: vision=dynamic; HxW: 672x1008
    name = check_name(cfg.name or f"{cfg.precision.name}-{size}{suffix}", "name", f"{recipe}: name",
                      RecipeError, fix)
    if name == LOGS or name.endswith(".failed"):
        raise RecipeError(f"name={name!r} is reserved (the build writes {LOGS}/ and <name>.failed/ itself)",
                          where=f"{recipe}: name", fix="choose another name")
    return Path(cfg.out_dir) / model / name


def check_replaceable(final: Path) -> None:
    """The build replaces `final` only if it made it: absent, an empty folder, or an artifact set (a folder
    with its own manifest.json). Anything else is the user's, and is never deleted."""
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise RecipeError(f"{final} exists and is not an artifact folder (a file or a link)", where=str(final),
                          fix="choose another name=... or out_dir=..., or move that path away yourself")
    manifest = final / MANIFEST
    if any(final.iterdir()) and not (manifest.is_file() and not manifest.is_symlink()):
        raise RecipeError(f"{final} exists, is not empty and is not a vlmforge artifact set (no {MANIFEST}); "
                          "vlmforge will not replace it", where=str(final),
                          fix="choose another name=... or out_dir=..., or move that folder away yourself")


def work_dirs(final: Path) -> tuple[Path, Path]:
    """(staging, scratch) of this process for `final`: the set being written, and the FP32 graphs behind
    transformed ones (hardlinks into the cache, for the nodes that read them)."""
    tag = owner_tag()
    return final.parent / f".{final.name}.staging-{tag}", final.parent / f".{final.name}.fp32-{tag}"


def prepare(final: Path, staging: Path, scratch: Path) -> None:
    """Make the model's folder, remove the working folders of dead builds, start an empty staging folder."""
    make_dir(final.parent, "the artifact folder", "out_dir")
    remove_stale(final.parent, WORK_DIR)
    for d in (staging, scratch):
        if d.exists():
            shutil.rmtree(d)
    staging.mkdir()


def publish(staging: Path, final: Path, manifest: dict) -> None:
    """Rename into place, then write the manifest there (atomically): at no moment does a directory without
    its final files carry a manifest. An older set at `final` (check_replaceable) is renamed aside whole
    first: until the new set has its manifest, nothing at `final` verifies."""
    old = None
    check_replaceable(final)
    if os.path.lexists(final):
        old = final.parent / f".{final.name}.old-{owner_tag()}"
        os.rename(final, old)
        (old / MANIFEST).unlink(missing_ok=True)
    os.rename(staging, final)
    write_manifest(final, manifest)
    failed = final.parent / f"{final.name}.failed"
    if (failed / FAILED_MARKER).is_file() and not failed.is_symlink():
        shutil.rmtree(failed, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def park_failed(staging: Path, final: Path, checks: list[CheckResult]) -> Path:
    failed = final.parent / f"{final.name}.failed"
    if os.path.lexists(failed):
        if failed.is_symlink() or not (failed / FAILED_MARKER).is_file():
            raise RecipeError(f"{failed} exists and was not made by vlmforge; the failed build is not kept",
                              where=str(failed), fix="move that folder away to keep the next failed build's report")
        shutil.rmtree(failed)
    (staging / VALIDATION_FILE).write_text(json.dumps([c.to_json() for c in checks], indent=2) + "\n")
    (staging / FAILED_MARKER).write_text("a vlmforge build that failed validation; see validation.json\n")
    os.rename(staging, failed)
    return failed


def write_build_log(final: Path, timings: dict, cache: dict) -> None:
    """Wall-clock facts go beside the artifact set, never into the manifest (which must be reproducible)."""
    logs = final.parent / LOGS
    make_dir(logs, "the build log folder", "out_dir")
    (logs / f"{final.name}.json").write_text(json.dumps({"seconds": timings, "cache": cache}, indent=2, sort_keys=True) + "\n")
