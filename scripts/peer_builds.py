"""vlmforge's export side by side with the peers' on one checkpoint: wall time, peak RSS and output bytes,
each build in its own process (its own rusage), one after another in one run.

    python scripts/peer_builds.py --checkpoint CK --mobius /path/to/venv/bin/mobius          (FP32, validate=off)
    python scripts/peer_builds.py --checkpoint CK --genai-builder --precision int4_mixed --validate on \
        --vision large validate.weights=random

- vlmforge: `vlmforge export model=RECIPE model.checkpoint=CK precision=P validate=...` from an empty cache.
- mobius (`mobius build --config CK --ep cpu --dtype f32`, PyPI mobius-onnx in a venv of its own, given by
  --mobius): FP32 rows only.
- the onnxruntime-genai builder (`python -m onnxruntime_genai.models.builder -i CK -p int4 -e cpu`, as
  `make bench` runs it): INT4 rows only. For Qwen2.5-VL it writes the text decoder alone.
vlmforge also writes vision, embedding and runtime configs (and validates, with --validate on); the peers
write what they write. Everything is under --work, removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_check import GIB, REPO, du, run  # noqa: E402  (the same child runner and disk count)


def rows(args, work: Path) -> list[dict]:
    out = []
    base = "int4" if args.precision.startswith("int4") else "fp32"
    vlm = work / "vlmforge"
    cmd = [sys.executable, "-m", "vlmforge.cli", "export", f"model={args.recipe}", f"model.checkpoint={args.checkpoint}",
           f"precision={args.precision}", f"vision={args.vision}", f"validate={'standard' if args.validate == 'on' else 'off'}",
           f"out_dir={vlm / 'out'}", f"cache_dir={vlm / 'cache'}", *args.overrides]
    out.append(("vlmforge", cmd, vlm / "out", vlm / "out.log"))
    if args.mobius and base == "fp32":
        mob = work / "mobius"
        out.append(("mobius", [args.mobius, "build", "--config", str(args.checkpoint), "--ep", "cpu", "--dtype", "f32",
                               str(mob / "out")], mob / "out", mob / "out.log"))
    if args.genai_builder and base == "int4":
        gb = work / "genai-builder"
        out.append(("onnxruntime-genai builder", [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                                                  str(args.checkpoint), "-o", str(gb / "out"), "-p", "int4", "-e", "cpu",
                                                  "-c", str(gb / "cache")], gb / "out", gb / "out.log"))
    table = []
    for tool, cmd, produced, log in out:
        log.parent.mkdir(parents=True, exist_ok=True)
        rc, seconds, peak = run(cmd, log)
        table.append({"tool": tool, "exit": rc, "seconds": seconds, "peak_rss": peak, "bytes": du(produced),
                      "log": str(log)})
        print(f"{tool}: exit {rc}, {seconds:.0f} s, peak {peak / GIB:.2f} GiB", flush=True)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--recipe", default="qwen2_5_vl_3b")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--vision", default="small")
    p.add_argument("--validate", choices=("on", "off"), default="off")
    p.add_argument("--mobius", default=None, help="the mobius executable (a venv of its own)")
    p.add_argument("--genai-builder", action="store_true")
    p.add_argument("--work", default=str(REPO / ".work" / "peer-builds"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("overrides", nargs="*", help="more recipe overrides for the vlmforge build "
                                                 "(e.g. validate.weights=random on a random-weight checkpoint)")
    args = p.parse_args()
    work = Path(args.work)
    if work.is_symlink() or (work.exists() and (not work.is_dir() or any(work.iterdir()))):
        print(f"error: --work {work} exists and is not an empty folder; fix: pass a new folder", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    try:
        table = rows(args, work)
    finally:
        if not args.keep:  # only what this run made: its own subfolders, then the folder if left empty
            for sub in ("vlmforge", "mobius", "genai-builder"):
                shutil.rmtree(work / sub, ignore_errors=True)
            if not any(work.iterdir()):
                work.rmdir()
    print(f"\n{args.checkpoint} ({args.precision}, validate {args.validate})\n")
    print("| tool | exit | wall s | peak RSS GiB | output GiB |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['tool']} | {r['exit']} | {r['seconds']:.1f} | {r['peak_rss'] / GIB:.2f} | {r['bytes'] / GIB:.2f} |")
    return 0 if all(r["exit"] == 0 for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
