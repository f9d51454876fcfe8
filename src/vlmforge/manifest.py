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
from vlmforge.errors import ArtifactError
from vlmforge.source import sha256_file

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
TOOLCHAIN_PACKAGES = (
    "torch", "transformers", "tokenizers", "safetensors", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
    "onnxruntime-genai", "numpy", "pillow", "hydra-core", "omegaconf", "jsonschema",
)


def schema() -> dict:
    return json.loads(resources.files("vlmforge").joinpath("schemas/manifest.schema.json").read_text())


def toolchain() -> dict:
    packages = {}
    for name in TOOLCHAIN_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "packages": packages}


def hash_files(directory: Path) -> dict[str, dict]:
    """{relative posix path: {sha256, bytes}} for every file but the manifest, sorted."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
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
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ArtifactError(
            f"no {MANIFEST} in {directory}: not a complete vlmforge artifact set",
            where=str(directory),
            fix="re-run the build (`vlmforge export ...`); an interrupted build leaves no manifest",
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{MANIFEST} is not valid JSON ({exc})", where=str(path), fix="rebuild the artifact set") from exc
    validate_manifest(data, str(path))
    return data


@dataclass
class VerifyReport:
    directory: Path
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    validation_passed: bool = True

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.unlisted) and self.validation_passed

    def lines(self) -> list[str]:
        out = [f"changed (sha256 differs): {p}" for p in self.changed]
        out += [f"missing: {p}" for p in self.missing]
        out += [f"not listed in manifest: {p}" for p in self.unlisted]
        if not self.validation_passed:
            out.append("manifest records failed validation checks")
        return out


def verify_dir(directory: Path) -> VerifyReport:
    directory = Path(directory)
    data = read_manifest(directory)
    report = VerifyReport(directory, validation_passed=bool(data["validation"]["passed"]))
    listed = data["files"]
    actual = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    for rel, want in sorted(listed.items()):
        p = directory / rel
        if not p.is_file():
            report.missing.append(rel)
        elif p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
            report.changed.append(rel)
    report.unlisted = sorted(actual - set(listed))
    return report
