"""The release's CLI: `vlmforge publish`, and what `vlmforge verify` runs on a release (vlmforge.cli calls
these; argparse and printing only)."""

from __future__ import annotations

from pathlib import Path

from vlmforge.core.hashing import sha256_file
from vlmforge.release.files import tarball_path
from vlmforge.release.publish import publish
from vlmforge.release.verify import verify_release


def add_parsers(sub) -> None:
    """Register `vlmforge publish` on the CLI's sub-parsers."""
    p = sub.add_parser("publish", help="turn a verified artifact set into a release folder + reproducible tarball")
    p.add_argument("directory", help="artifact directory (with manifest.json)")
    p.add_argument("--to", required=True, help="release folder to create; the tarball goes beside it as <to>.tar.gz")
    p.add_argument("--no-tarball", action="store_true", help="write the folder only")
    p.add_argument("--hub-repo", help="also upload the release folder to this Hugging Face model repo")
    p.add_argument("--hub-revision", help="branch of the hub repo (default: main)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    release = publish(Path(args.directory), Path(args.to), tarball=not args.no_tarball,
                      hub_repo=args.hub_repo, hub_revision=args.hub_revision)
    print(f"published {release}")
    if not args.no_tarball:
        tar = tarball_path(release)
        print(f"tarball   {tar} (sha256 {sha256_file(tar)})")
    return 0


def cmd_verify_release(path: Path) -> int:
    """What `vlmforge verify PATH` should do when `is_release(PATH)`."""
    report = verify_release(path)
    for line in report.lines():
        print(line)
    print(f"{path}: {'OK' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1
