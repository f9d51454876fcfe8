"""`vlmforge verify` on a release: SHA256SUMS against the files (parsed strictly), and the manifest through
`artifact.manifest.verify_dir`, the one verification. A tarball is checked through `tarball.safe_extract`."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.artifact.manifest import MAX_MANIFEST_BYTES, VerifyReport, read_manifest, verify_dir
from vlmforge.core.errors import ArtifactError
from vlmforge.core.hashing import sha256_file
from vlmforge.core.paths import is_safe_relative, open_regular
from vlmforge.release.files import RESERVED, SUMS, release_files
from vlmforge.release.tarball import safe_extract


@dataclass
class ReleaseReport:
    path: Path
    manifest: VerifyReport
    sums_changed: list[str] = field(default_factory=list)  # hash in SHA256SUMS differs from the file
    sums_missing: list[str] = field(default_factory=list)  # listed in SHA256SUMS, not present
    sums_unlisted: list[str] = field(default_factory=list)  # present, not listed in SHA256SUMS
    sums_malformed: list[str] = field(default_factory=list)  # lines that are not `<hex>  <path>`

    @property
    def ok(self) -> bool:
        return self.manifest.ok and not (self.sums_changed or self.sums_missing or self.sums_unlisted
                                         or self.sums_malformed)

    def lines(self) -> list[str]:
        out = list(self.manifest.lines())
        out += [f"{SUMS}: sha256 differs: {p}" for p in self.sums_changed]
        out += [f"{SUMS}: missing: {p}" for p in self.sums_missing]
        out += [f"{SUMS}: not listed: {p}" for p in self.sums_unlisted]
        out += [f"{SUMS}: malformed line: {line!r}" for line in self.sums_malformed]
        return out


def is_release(path: Path) -> bool:
    """True for a release tarball or a folder with SHA256SUMS (what `vlmforge verify` should route here)."""
    path = Path(path)
    return (path.is_file() and path.name.endswith((".tar.gz", ".tgz"))) or (path / SUMS).is_file()


def verify_release(path: Path) -> ReleaseReport:
    """Check a release folder or tarball: SHA256SUMS against the files, and the manifest (verify_dir).

    Each file is hashed once: files the manifest lists are hashed by verify_dir and their SHA256SUMS entry
    must equal the manifest's hash; the model card and the manifest itself are hashed here.
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix=".vlmforge-verify-") as tmp:
            report = verify_release(safe_extract(path, Path(tmp)))
            report.path = path
            return report
    if not (path / SUMS).is_file():
        raise ArtifactError(f"no {SUMS} in {path}: not a vlmforge release", where=str(path),
                            fix="publish the artifact set with `vlmforge publish DIR --to RELEASE`; "
                                "for a plain artifact set use `vlmforge verify DIR`")
    with open_regular(path / SUMS, str(path / SUMS)) as f:
        sums, malformed = parse_sha256sums(f.read(MAX_MANIFEST_BYTES).decode("utf-8", errors="replace"))
    manifest = read_manifest(path)
    mreport = verify_dir(path)
    mreport.unlisted = [p for p in mreport.unlisted if p not in RESERVED]
    report = ReleaseReport(path, mreport, sums_malformed=malformed)
    present = release_files(path)
    report.sums_unlisted = [p for p in present if p not in sums]
    for rel, want in sorted(sums.items()):
        if not (path / rel).is_file() or (path / rel).is_symlink():
            report.sums_missing.append(rel)
        elif rel in manifest["files"] and rel not in mreport.missing:
            if want != manifest["files"][rel]["sha256"] or rel in mreport.changed:
                report.sums_changed.append(rel)
        elif sha256_file(path / rel) != want:
            report.sums_changed.append(rel)
    return report


def parse_sha256sums(text: str) -> tuple[dict[str, str], list[str]]:
    """`<64 hex>  <path>` or `<64 hex> *<path>` lines -> ({path: hex}, malformed lines)."""
    sums, bad = {}, []
    for line in text.splitlines():
        digest, sep, rest = line.partition(" ")
        name = rest[1:] if rest[:1] in (" ", "*") else None
        ok_digest = len(digest) == 64 and all(c in "0123456789abcdef" for c in digest.lower())
        if not (sep and ok_digest and name) or name in sums or not is_safe_relative(name):
            bad.append(line)
            continue
        sums[name] = digest.lower()
    return sums, bad
