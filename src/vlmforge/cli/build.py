"""`vlmforge export` (one artifact set from a recipe) and `vlmforge export-all` (every cell of a matrix)."""

from __future__ import annotations

import sys

from vlmforge.cli.report import print_checks


def cmd_export(args) -> int:
    from vlmforge.build import run_build
    from vlmforge.progress import Progress
    from vlmforge.recipe import compose, recipes_dir

    cfg = compose(args.overrides, recipes_dir(args.recipes))
    report = run_build(cfg, force=args.force, progress=Progress())
    print_checks(report.checks)
    print(f"built {report.directory} ({len(report.checks)} checks passed, {report.seconds['total']:.1f} s; "
          f"cache: {report.cache_summary()})")
    return 0


def cmd_export_all(args) -> int:
    from vlmforge.recipe import recipes_dir
    from vlmforge.recipe.cells import matrix_table
    from vlmforge.recipe.matrix import export_all

    rows = export_all(recipes_dir(args.recipes), args.matrix, list(args.overrides), force=args.force)
    print(matrix_table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} cells failed; their logs: " + ", ".join(r["log"] for r in failed),
              file=sys.stderr)
    return 1 if failed else 0


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="build one artifact set from a recipe (Hydra overrides)")
    e.add_argument("overrides", nargs="*", help="e.g. model=<recipe> model.checkpoint=/models/x vision=large")
    e.add_argument("--force", action="store_true", help="rebuild every stage and re-run validation (ignore the cache)")
    e.set_defaults(func=cmd_export)
    a = sub.add_parser("export-all", help="build every cell of a matrix recipe (one Hydra multirun)")
    a.add_argument("--matrix", default="default", help="recipes/matrix/<name>.yaml (default: default)")
    a.add_argument("--force", action="store_true", help="rebuild every stage of every cell (ignore the cache)")
    a.add_argument("overrides", nargs="*",
                   help="overrides applied to every cell, e.g. validate.chain_tokens=4 hydra/launcher=joblib")
    a.set_defaults(func=cmd_export_all)
