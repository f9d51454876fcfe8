"""`vlmforge verify` (re-hash a set or a release) and `vlmforge validate` (re-run a set's checks)."""

from __future__ import annotations

from pathlib import Path

from vlmforge.cli.report import print_checks


def cmd_verify(args) -> int:
    from vlmforge.artifact.manifest import verify_dir
    from vlmforge.release.commands import cmd_verify_release
    from vlmforge.release.verify import is_release

    if is_release(Path(args.directory)):  # a release folder (SHA256SUMS) or tarball from `vlmforge publish`
        return cmd_verify_release(Path(args.directory))
    report = verify_dir(Path(args.directory))
    for line in report.lines():
        print(line)
    print(f"{args.directory}: {'OK' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1


def cmd_validate(args) -> int:
    from vlmforge.build.revalidate import revalidate

    checks = revalidate(Path(args.directory), checkpoint=args.checkpoint)
    print_checks(checks)
    ok = all(c.passed for c in checks)
    print(f"{args.directory}: {len(checks)} checks, {'all passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def add_parsers(sub) -> None:
    v = sub.add_parser("verify", help="re-hash an artifact directory (or a release folder/tarball) against its manifest")
    v.add_argument("directory")
    v.set_defaults(func=cmd_verify)
    val = sub.add_parser("validate", help="re-run every validation check of an artifact directory")
    val.add_argument("directory")
    val.add_argument("--checkpoint", help="the source checkpoint folder, if it moved since the build "
                                          "(default: the manifest's model.checkpoint)")
    val.set_defaults(func=cmd_validate)
