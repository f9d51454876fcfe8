"""Reproducibility check: build one recipe twice from scratch and compare every output file byte for byte.

    python -m vlmforge.repro model=tiny_qwen2_5_vl vision=small          (what `make repro-check` runs)
    python -m vlmforge.repro --relocate model=tiny_qwen3_vl               (2nd build from a copy of the code
                                                                           at another path, in a fresh process)
    python -m vlmforge.repro --compare DIR_A DIR_B                         (compare two existing sets)

Each build gets its own fresh `out_dir` and `cache_dir`, so the embedded fixture checkpoint is rewritten
too. Exit status 0 when both artifact sets are byte-identical, 1 when any file differs (the table says
which, and for `.onnx` and `manifest.json` files, what inside them differs), 2 on a user error.

`--relocate` matters: torch.onnx records a Python stack trace per node (`pkg.torch.onnx.stack_trace`),
with absolute paths of the vlmforge checkout and the virtual environment, so two builds from the same
checkout agree while a build on CI and one on a laptop do not. `normalize_model` strips that metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.core.hashing import sha256_file
from vlmforge.core.errors import ArtifactError, ExportError, VlmforgeError
from vlmforge.exporters.onnx_export import DEBUG_METADATA_PREFIXES, normalize_model  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# Exporter debug metadata on nodes / values: provenance for humans, absolute paths inside. Not semantics:
# onnxruntime and the vlmforge validators never read it.
# Recipe keys that say where a build ran, not what it built.
LOCATION_KEYS = ("out_dir", "cache_dir")


# -- comparison (pure apart from reading the two folders) --------------------------------------------------------------
@dataclass(frozen=True)
class FileRow:
    path: str
    status: str  # same | differs | only in A | only in B
    sha_a: str | None
    sha_b: str | None
    detail: str = ""


@dataclass
class ReproReport:
    a: Path
    b: Path
    rows: list[FileRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.status == "same" for r in self.rows)

    @property
    def differing(self) -> list[FileRow]:
        return [r for r in self.rows if r.status != "same"]

    def table(self) -> str:
        lines = [f"A: {self.a}", f"B: {self.b}", "", "file | status | sha256 A | sha256 B | what differs"]
        for r in self.rows:
            lines.append(" | ".join([r.path, r.status, (r.sha_a or "-")[:12], (r.sha_b or "-")[:12], r.detail]))
        verdict = "byte-identical" if self.ok else f"{len(self.differing)} of {len(self.rows)} files differ"
        lines += ["", f"reproducible: {'yes' if self.ok else 'NO'} ({verdict})"]
        return "\n".join(lines)



def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def compare_dirs(a: Path, b: Path) -> ReproReport:
    """sha256 of every file in both folders (manifest included); differing files get an explanation."""
    a, b = Path(a), Path(b)
    for d in (a, b):
        if not d.is_dir():
            raise ArtifactError(f"{d} is not a folder", where=str(d), fix="pass two artifact directories to compare")
    fa, fb = _files(a), _files(b)
    report = ReproReport(a, b)
    for rel in sorted(set(fa) | set(fb)):
        if rel not in fb:
            report.rows.append(FileRow(rel, "only in A", sha256_file(fa[rel]), None))
        elif rel not in fa:
            report.rows.append(FileRow(rel, "only in B", None, sha256_file(fb[rel])))
        else:
            sa, sb = sha256_file(fa[rel]), sha256_file(fb[rel])
            detail = "" if sa == sb else explain(fa[rel], fb[rel])
            report.rows.append(FileRow(rel, "same" if sa == sb else "differs", sa, sb, detail))
    return report


def explain(fa: Path, fb: Path) -> str:
    """One line on what differs inside two versions of a file (JSON keys, ONNX parts); '' when unknown."""
    try:
        if fa.suffix == ".json":
            return _explain_json(json.loads(fa.read_text()), json.loads(fb.read_text()))
        if fa.suffix == ".onnx":
            return _explain_onnx(fa, fb)
    except (ValueError, OSError) as exc:  # unreadable / not what the suffix says: the hash difference stands
        return f"(could not inspect: {type(exc).__name__})"
    return ""


def json_diff(x, y, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(x, dict) and isinstance(y, dict):
        return [p for k in sorted(set(x) | set(y)) for p in json_diff(x.get(k), y.get(k), f"{path}.{k}" if path else k)]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [p for i, (u, v) in enumerate(zip(x, y)) for p in json_diff(u, v, f"{path}[{i}]")]
    return [] if x == y else [path or "(top level)"]


def _explain_json(x, y) -> str:
    paths = json_diff(x, y)
    paths.sort(key=lambda p: p.startswith("files."))  # causes first; `files.*` follows from the files above
    shown = ", ".join(paths[:6]) + (f" (+{len(paths) - 6} more)" if len(paths) > 6 else "")
    return f"JSON keys differ: {shown}" if paths else "same JSON, different formatting"


def _explain_onnx(fa: Path, fb: Path) -> str:
    import onnx

    ma, mb = (onnx.load(str(f), load_external_data=False) for f in (fa, fb))
    out = []
    for attr in ("producer_name", "producer_version", "doc_string", "ir_version"):
        if getattr(ma, attr) != getattr(mb, attr):
            out.append(f"model.{attr}")
    if [n.name for n in ma.graph.node] != [n.name for n in mb.graph.node]:
        out.append("node names/order")
    if [(t.name, hashlib.sha256(t.SerializeToString()).digest()) for t in ma.graph.initializer] != \
            [(t.name, hashlib.sha256(t.SerializeToString()).digest()) for t in mb.graph.initializer]:
        out.append("initializers")
    keys = _differing_metadata_keys(ma, mb)
    if keys:
        out.append("node metadata " + ",".join(sorted(keys)))
    same_after = _canonical(normalize_model(ma)) == _canonical(normalize_model(mb))
    verdict = "identical after normalize_model" if same_after else "still differs after normalize_model"
    return f"{'; '.join(out) or 'serialization'} ({verdict})"


def _differing_metadata_keys(ma, mb) -> set[str]:
    keys: set[str] = set()
    for na, nb in zip(ma.graph.node, mb.graph.node):
        pa = {p.key: p.value for p in na.metadata_props}
        pb = {p.key: p.value for p in nb.metadata_props}
        keys |= {k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k)}
    return keys


def _canonical(model) -> bytes:
    return model.SerializeToString(deterministic=True)


# -- the fix for onnx_export.py ----------------------------------------------------------------------------------------
def recorded_recipe(recipe: dict) -> dict:
    """The recipe as a manifest should record it: without the keys that say where the build ran."""
    return {k: v for k, v in recipe.items() if k not in LOCATION_KEYS}


# -- the double build --------------------------------------------------------------------------------------------------
def repro_check(overrides: list[str], workdir: Path, recipes: Path | None = None, *, relocate: bool = False,
                keep: bool = False) -> ReproReport:
    """Build `overrides` twice, each into a fresh out_dir and cache_dir under a new folder in `workdir`, and
    compare the two artifact sets. With `relocate`, the second build runs in a new Python process from a
    copy of the vlmforge package at another path. The scratch folder is removed when the builds agree
    (unless `keep`) and kept for inspection when they do not."""
    from vlmforge.recipe import recipes_dir

    recipes = recipes_dir(str(recipes) if recipes else None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=workdir, prefix="repro-")).resolve()
    dirs = []
    for run in ("a", "b"):
        run_overrides = list(overrides) + [f"out_dir={root / run / 'out'}", f"cache_dir={root / run / 'cache'}"]
        log.info("repro build %s: %s", run, " ".join(run_overrides))
        if run == "b" and relocate:
            dirs.append(_build_relocated(run_overrides, recipes, root / "relocated"))
        else:
            dirs.append(_build_here(run_overrides, recipes))
    report = compare_dirs(*dirs)
    if report.ok and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _build_here(overrides: list[str], recipes: Path) -> Path:
    from vlmforge.build import run_build
    from vlmforge.recipe import compose

    return run_build(compose(overrides, recipes)).directory


_CHILD = ("import sys; from pathlib import Path; from vlmforge.build import run_build; "
          "from vlmforge.recipe import compose; print(run_build(compose(sys.argv[2:], Path(sys.argv[1]))).directory)")


def _build_relocated(overrides: list[str], recipes: Path, where: Path) -> Path:
    """Build in a child interpreter importing a copy of the vlmforge package from `where`."""
    import vlmforge

    shutil.copytree(Path(vlmforge.__file__).parent, where / "vlmforge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(recipes), *overrides], env=env, cwd=where,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExportError(f"the relocated build failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}",
                            where=str(where), fix="run the same overrides with `vlmforge export` to see the error")
    return Path(proc.stdout.strip().splitlines()[-1])


# -- CLI ---------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmforge.repro",
                                description="Build a recipe twice from scratch and compare the artifact sets byte for byte.")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of recipes/build.yaml (default: the default recipe)")
    p.add_argument("--workdir", default=".work/repro", help="scratch folder for the two builds (default: .work/repro)")
    p.add_argument("--recipes", help="recipes folder (default: ./recipes)")
    p.add_argument("--relocate", action="store_true",
                   help="run the 2nd build in a new process from a copy of the code at another path")
    p.add_argument("--keep", action="store_true", help="keep both builds even when they agree")
    p.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                   help="build nothing: compare two existing artifact sets (e.g. tonight's and last night's)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.compare:
            report = compare_dirs(Path(args.compare[0]), Path(args.compare[1]))
        else:
            report = repro_check(args.overrides, Path(args.workdir), Path(args.recipes) if args.recipes else None,
                                 relocate=args.relocate, keep=args.keep)
    except VlmforgeError as err:
        print(err.render(), file=sys.stderr)
        return 2
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
