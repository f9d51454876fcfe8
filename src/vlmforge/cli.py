"""Composition root: argument parsing and Hydra live here only; everything below takes plain arguments."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from vlmforge.errors import RecipeError, VlmforgeError

log = logging.getLogger("vlmforge")


def recipes_dir(explicit: str | None = None) -> Path:
    """--recipes, else ./recipes, else the recipes folder of the source tree this package runs from."""
    for cand in (explicit, os.environ.get("VLMFORGE_RECIPES"), "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if cand and (Path(cand) / "build.yaml").is_file():
            return Path(cand).resolve()
    raise RecipeError("no recipes folder with build.yaml found", where=os.getcwd(),
                      fix="run from the vlmforge checkout or pass --recipes /path/to/recipes")


def compose(overrides: list[str], recipes: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vlmforge.config import from_omegaconf, register_schema, unknown_key_error

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(recipes), version_base=None):
            cfg = hydra_compose(config_name="build", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # Hydra raises ValueError for some overrides
        missing = re.search(r"Could not override '([^']+)'", str(exc))
        if missing:
            raise unknown_key_error(missing.group(1), f"{recipes}/build.yaml with overrides {list(overrides)}") from exc
        raise RecipeError(
            f"recipe does not compose: {' '.join(str(exc).split())[:600]}",
            where=f"{recipes}/build.yaml with overrides {list(overrides)}",
            fix=f"check the override names; config groups live in {recipes}/<group>/<option>.yaml",
        ) from exc
    return from_omegaconf(cfg, recipe=f"{recipes}/build.yaml {' '.join(overrides)}".strip())


def _print_checks(checks) -> None:
    for c in checks:
        print("  " + c.line())


def cmd_export(args) -> int:
    from vlmforge.build import run_build

    cfg = compose(args.overrides, recipes_dir(args.recipes))
    report = run_build(cfg)
    _print_checks(report.checks)
    print(f"built {report.directory} ({len(report.checks)} checks passed, {report.seconds['total']:.1f} s)")
    return 0


def cmd_export_all(args) -> int:
    import yaml

    from vlmforge.build import run_build

    recipes = recipes_dir(args.recipes)
    matrix_file = recipes / "matrix" / f"{args.matrix}.yaml"
    if not matrix_file.is_file():
        raise RecipeError(f"no matrix {args.matrix!r}", where=str(matrix_file),
                          fix=f"use one of {sorted(p.stem for p in (recipes / 'matrix').glob('*.yaml'))}")
    cells = yaml.safe_load(matrix_file.read_text())["cells"]
    failures = 0
    rows = []
    for cell in cells:
        overrides = list(cell) + list(args.overrides)
        try:
            report = run_build(compose(overrides, recipes))
            rows.append((" ".join(overrides), "ok", str(report.directory)))
        except VlmforgeError as err:
            failures += 1
            print(err.render(), file=sys.stderr)
            rows.append((" ".join(overrides), "FAILED", err.what[:80]))
    print("\ncell | status | result")
    for r in rows:
        print(" | ".join(r))
    return 1 if failures else 0


def cmd_verify(args) -> int:
    from vlmforge.manifest import verify_dir

    report = verify_dir(Path(args.directory))
    for line in report.lines():
        print(line)
    print(f"{args.directory}: {'OK' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1


def cmd_validate(args) -> int:
    from vlmforge.revalidate import revalidate

    checks = revalidate(Path(args.directory))
    _print_checks(checks)
    ok = all(c.passed for c in checks)
    print(f"{args.directory}: {len(checks)} checks, {'all passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_fixture(args) -> int:
    from vlmforge.registry import get_family

    out = get_family(args.family).write_fixture(Path(args.out))
    print(out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmforge", description="Build, validate, verify and run ONNX artifact sets of vision-language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--recipes", help="recipes folder (default: ./recipes)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="build one artifact set from a recipe (Hydra overrides)")
    e.add_argument("overrides", nargs="*", help="e.g. model=qwen2_5_vl_3b model.checkpoint=/models/x vision=large")
    e.set_defaults(func=cmd_export)
    a = sub.add_parser("export-all", help="build every cell of a matrix recipe")
    a.add_argument("--matrix", default="default")
    a.add_argument("overrides", nargs="*", help="overrides applied to every cell")
    a.set_defaults(func=cmd_export_all)
    v = sub.add_parser("verify", help="re-hash an artifact directory against its manifest")
    v.add_argument("directory")
    v.set_defaults(func=cmd_verify)
    val = sub.add_parser("validate", help="re-run every validation check of an artifact directory")
    val.add_argument("directory")
    val.set_defaults(func=cmd_validate)
    f = sub.add_parser("fixture", help="write an embedded tiny checkpoint (Hugging Face folder)")
    f.add_argument("family")
    f.add_argument("out")
    f.set_defaults(func=cmd_fixture)
    from vlmforge.runtime.commands import register

    register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except VlmforgeError as err:
        if args.verbose:
            log.exception("details")
        print(err.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
