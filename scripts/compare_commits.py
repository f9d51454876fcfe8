"""Build a matrix at two commits and compare the artifact sets byte for byte.

    python scripts/compare_commits.py d7af6ec HEAD                 (recipes/matrix/smoke.yaml)
    python scripts/compare_commits.py d7af6ec HEAD --matrix default
    make compare-commits A=d7af6ec B=HEAD

Why: a restructuring must not change what the build produces. Each commit is checked out into its own
`git worktree` and built from scratch (its own out_dir and cache_dir, so no stage is shared between the two),
with this interpreter and `PYTHONPATH=<worktree>/src` (one venv for both; the toolchain is therefore the same
on both sides). Then every file of every artifact set is compared: graphs, tokenizer files and runtime configs
by sha256; `manifest.json` field by field (the report lists the dotted paths that differ). Build logs
(`logs/`, wall-clock facts) are not compared. Exit status 0 only if everything is identical.

A finished build is kept under --work/<commit> (with a `.built` stamp) and reused by the next comparison, so
comparing a new head against the same base builds only the head.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAMP = ".built"


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def build(commit: str, work: Path, matrix: str, overrides: list[str]) -> Path:
    """Check `commit` out into work/<sha>/tree, build the matrix there; return its out_dir."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    root = work / sha[:12]
    out = root / "artifacts"
    if (root / STAMP).is_file() and (root / STAMP).read_text().strip() == " ".join([matrix, *overrides]):
        print(f"{commit} ({sha[:12]}): reusing the build in {out}", flush=True)
        return out
    if root.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(root / "tree")], cwd=REPO, capture_output=True)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    git("worktree", "add", "--detach", str(root / "tree"), sha)
    env = {**os.environ, "PYTHONPATH": str(root / "tree" / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run([sys.executable, "-c", "import vlmforge; print(vlmforge.__file__)"], env=env,
                           cwd=root / "tree", check=True, capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to((root / "tree" / "src").resolve()):
        sys.exit(f"error: vlmforge imports from {where}, not from the worktree of {commit}\n"
                 f"fix: run this script with a venv whose vlmforge does not shadow PYTHONPATH")
    cmd = [sys.executable, "-m", "vlmforge.cli", "export-all", "--matrix", matrix,
           f"out_dir={out}", f"cache_dir={root / 'work'}", *overrides]
    print(f"{commit} ({sha[:12]}): building matrix {matrix} -> {out}", flush=True)
    with open(root / "build.log", "w") as log:
        rc = subprocess.run(cmd, cwd=root / "tree", env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"error: the build of {commit} failed (exit {rc})\nwhere: {root / 'build.log'}\n"
                 "fix: read the log; a comparison needs both builds to succeed")
    (root / STAMP).write_text(" ".join([matrix, *overrides]) + "\n")
    return out


def artifact_files(out: Path) -> dict[str, Path]:
    """Relative path -> file, for every artifact set (folders holding a manifest.json), logs excluded."""
    files = {}
    for manifest in sorted(out.rglob("manifest.json")):
        for f in sorted(manifest.parent.iterdir()):
            if f.is_file():
                files[f.relative_to(out).as_posix()] = f
    return files


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def flatten(data, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": [1, 2]}} -> {"a.b[0]": 1, "a.b[1]": 2}: a manifest as leaf fields."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(data, list):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: data}


def manifest_diff(a: Path, b: Path) -> list[str]:
    fa, fb = flatten(json.loads(a.read_text())), flatten(json.loads(b.read_text()))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>"))


def compare(out_a: Path, out_b: Path) -> list[str]:
    """Print one line per file; return the lines that are not 'identical'."""
    files_a, files_b = artifact_files(out_a), artifact_files(out_b)
    problems = []
    for rel in sorted(set(files_a) | set(files_b)):
        if rel not in files_a or rel not in files_b:
            line = f"{rel}: only in {'A' if rel in files_a else 'B'}"
        elif files_a[rel].name == "manifest.json":
            fields = manifest_diff(files_a[rel], files_b[rel])
            same_bytes = files_a[rel].read_bytes() == files_b[rel].read_bytes()
            line = f"{rel}: " + ("identical" if same_bytes else
                                 f"different fields {fields}" if fields else "same fields, different bytes")
        else:
            line = f"{rel}: " + ("identical" if sha256(files_a[rel]) == sha256(files_b[rel]) else "different")
        print(line)
        if not line.endswith(": identical"):
            problems.append(line)
    if not files_a:
        problems.append("no artifact set was built")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="the base commit (e.g. d7af6ec)")
    p.add_argument("b", help="the commit to compare with it (e.g. HEAD)")
    p.add_argument("--matrix", default="smoke", help="recipes/matrix/<name>.yaml (default: smoke)")
    p.add_argument("--work", default=str(REPO / ".work" / "compare"), help="where the worktrees and builds go")
    p.add_argument("overrides", nargs="*", help="recipe overrides applied to both builds")
    args = p.parse_intermixed_args(argv)
    work = Path(args.work).resolve()
    out_a = build(args.a, work, args.matrix, args.overrides)
    out_b = build(args.b, work, args.matrix, args.overrides)
    problems = compare(out_a, out_b)
    n = len(artifact_files(out_a).keys() | artifact_files(out_b).keys())
    print(f"\n{n - len(problems)} of {n} files identical" + (f"; {len(problems)} differ" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
