"""The artifact manifest: files + sha256, I/O contracts, source and toolchain, validation results.

Written last and atomically (temp file + fsync + rename). `verify_dir` re-hashes every file and reports
what changed, is missing, or is not listed; a directory without a valid manifest is never complete.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import jsonschema

from vlmforge import __version__
from vlmforge.core.errors import ArtifactError
from vlmforge.core.hashing import file_stamp, sha256_file
from vlmforge.core.paths import check_relative, confine, open_regular, scan_tree

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
RELEASE_FILES = ("SHA256SUMS", "README.md")  # what `vlmforge publish` adds beside the listed files
MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is tens of KB; anything near this is not one
TOOLCHAIN_PACKAGES = (
    "torch", "transformers", "tokenizers", "safetensors", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
    "onnxruntime-genai", "numpy", "pillow", "hydra-core", "omegaconf", "jsonschema",
)


def schema() -> dict:
    """The manifest schema; a component's precision is one the transform table knows (the file lists the
    built-in ones for readers of the JSON alone)."""
    from vlmforge.transforms import TRANSFORMS

    data = json.loads(resources.files("vlmforge").joinpath("schemas/manifest.schema.json").read_text())
    data["$defs"]["component"]["properties"]["precision"]["enum"] = ["fp32", *TRANSFORMS]
    return data


def toolchain() -> dict:
    packages = {}
    for name in TOOLCHAIN_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "packages": packages}


def hash_files(directory: Path, known: dict | None = None) -> dict[str, dict]:
    """{relative posix path: {sha256, bytes}} for every file but the manifest, sorted. Only for folders the
    build made itself: a link or special file there is a bug, never something to describe. `known`: {path:
    {sha256, bytes, stat}} of files hashed as they were written (build.cache.Entry.materialize); such a file
    whose stamp (core.hashing.file_stamp) is still the same is not read again."""
    files, odd = scan_tree(directory)
    if odd:
        raise ArtifactError(f"the staging folder holds links or special files {odd}", where=str(directory),
                            fix="this is a vlmforge bug: builds write regular files only")
    known = known or {}
    out = {}
    for rel in files:
        if rel == MANIFEST:
            continue
        seen = known.get(rel)
        if seen is not None and seen.get("stat") == file_stamp(directory / rel):
            out[rel] = {"sha256": seen["sha256"], "bytes": seen["bytes"]}
        else:
            out[rel] = {"sha256": sha256_file(directory / rel), "bytes": (directory / rel).stat().st_size}
    return out


def validate_manifest(data: dict, where: str) -> None:
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ArtifactError(
            f"manifest schema_version {version} is newer than this vlmforge understands ({SCHEMA_VERSION})",
            where=where,
            fix="upgrade vlmforge to the version that wrote these artifacts",
        )
    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ArtifactError(
            f"manifest does not match its schema at {path}: {exc.message}",
            where=where,
            fix="rebuild the artifact set with `vlmforge export`; a hand-edited manifest is not trusted",
        ) from exc


def write_manifest(directory: Path, data: dict) -> Path:
    """Validate, then write `manifest.json` atomically: nobody ever sees a partial manifest."""
    directory = Path(directory)
    validate_manifest(data, str(directory / MANIFEST))
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a published manifest is world-readable like its files
        os.replace(tmp, directory / MANIFEST)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return directory / MANIFEST


def read_manifest(directory: Path) -> dict:
    """The schema-checked manifest of `directory`. Whatever the file holds (a folder, a link, binary bytes,
    gigabytes, JSON nested a million deep), the answer is the manifest or an ArtifactError."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not os.path.lexists(directory):
        raise ArtifactError(f"{directory} does not exist", where=str(directory),
                            fix="pass the path of an artifact set (a folder with manifest.json) or a release tarball")
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a folder", where=str(directory),
                            fix="pass the artifact set's folder (the one holding manifest.json)")
    if not os.path.lexists(path):
        raise ArtifactError(
            f"no {MANIFEST} in {directory}: not a complete vlmforge artifact set",
            where=str(directory),
            fix="re-run the build (`vlmforge export ...`); an interrupted build leaves no manifest",
        )
    fix = "rebuild the artifact set with `vlmforge export`, or fetch it again"
    with open_regular(path, str(path)) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a vlmforge manifest",
                            where=str(path), fix=fix)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{MANIFEST} is not UTF-8 text ({exc.reason} at byte {exc.start})", where=str(path),
                            fix=fix) from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{MANIFEST} is not valid JSON ({exc})", where=str(path), fix=fix) from None
    except RecursionError:
        raise ArtifactError(f"{MANIFEST} is nested too deeply to be a vlmforge manifest", where=str(path),
                            fix=fix) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{MANIFEST} holds a JSON {type(data).__name__}, not an object", where=str(path), fix=fix)
    validate_manifest(data, str(path))
    return data


@dataclass
class VerifyReport:
    directory: Path
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # symlinks, devices, fifos: never read, never part of a set
    validation_passed: bool = True
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def files_ok(self) -> bool:
        return not (self.changed or self.missing or self.unlisted or self.links)

    @property
    def ok(self) -> bool:
        return self.files_ok and self.validation_passed

    def lines(self) -> list[str]:
        out = [f"changed (sha256 differs): {p}" for p in self.changed]
        out += [f"missing: {p}" for p in self.missing]
        out += [f"not listed in manifest: {p}" for p in self.unlisted]
        out += [f"link or special file (not read): {p}" for p in self.links]
        if not self.validation_passed:
            checks = self.manifest.get("validation", {}).get("checks") if self.manifest else None
            out.append("manifest records failed validation checks" if checks else
                       "manifest records no validation (built with validate=off): not a validated set")
        return out


def verify_dir(directory: Path) -> VerifyReport:
    """The one verification of an artifact set (the CLI, publish, validate and the runtime all use it).

    Every listed path is confined to the set before it is looked at; the tree is walked without following
    links, and a link or special file anywhere in the set fails it without being read."""
    directory = Path(directory)
    data = read_manifest(directory)
    root = directory.resolve()
    where = str(directory / MANIFEST)
    report = VerifyReport(directory, validation_passed=bool(data["validation"]["passed"]), manifest=data)
    listed = data["files"]
    for rel in listed:
        check_relative(rel, root, where=where)  # a hostile key is refused before any file system call on it
    files, report.links = scan_tree(root)  # no links followed: every regular file found lies inside the set
    present = set(files) - {MANIFEST}
    if MANIFEST in report.links:
        report.links.remove(MANIFEST)  # open_regular in read_manifest already refused a linked manifest
    for rel, want in sorted(listed.items()):
        if rel not in present:
            if rel not in report.links:
                report.missing.append(rel)
        else:
            path = confine(root, rel, where=where)
            if path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
                report.changed.append(rel)
    report.unlisted = sorted(present - set(listed))
    return report


def check_verified(directory: Path, what: str, allow_unlisted: tuple[str, ...] = ()) -> dict:
    """verify_dir, raising one ArtifactError when any file differs; returns the manifest.
    `allow_unlisted`: top-level names that may be present without being listed (a release's own files)."""
    report = verify_dir(directory)
    report.unlisted = [p for p in report.unlisted if p not in allow_unlisted]
    if not report.files_ok:
        files = report.manifest["files"]
        expected = [f"{rel} should have sha256 {files[rel]['sha256']} ({files[rel]['bytes']} bytes)"
                    for rel in report.changed]
        raise ArtifactError(f"{what}: the artifact files do not match the manifest: "
                            + "; ".join(report.lines() + expected),
                            where=str(directory),
                            fix="restore the files from the original artifact set or rebuild it with `vlmforge export`")
    return report.manifest
