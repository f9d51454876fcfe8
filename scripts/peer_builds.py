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

Fair conditions: before each build every checkpoint file is read once (the time of that read is printed), so no
tool pays a cold page cache that the next one is spared (the checkpoint is 7.5 GB at 3B; this box reads ~250 MB/s
from disk, 30 s). `--rounds N` repeats the builds, the order reversed every other round, and the summary compares
the medians: the time of one build varies by tens of seconds on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_check import GIB, REPO, du, run_cpu  # noqa: E402  (the same child runner and disk count)


def warm(checkpoint: Path) -> float:
    """Read every file of the checkpoint once (into the page cache); returns the seconds it took."""
    t = time.perf_counter()
    for f in sorted(checkpoint.iterdir()):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return time.perf_counter() - t


def builds(args, work: Path) -> list[tuple[str, list[str], Path, Path]]:
    """(tool, command, what it writes, its log) of each build of one round, under `work`."""
    out = []
    base = "int4" if args.precision.startswith("int4") else "fp32"
    vlm = work / "vlmforge"
    cmd = [sys.executable, "-m", "vlmforge.cli", "-v", "export", f"model={args.recipe}",
           f"model.checkpoint={args.checkpoint}", f"precision={args.precision}", f"vision={args.vision}",
           f"validate={'standard' if args.validate == 'on' else 'off'}", f"out_dir={vlm / 'out'}",
           f"cache_dir={vlm / 'cache'}", *args.overrides]
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
    return out


def rows(args, work: Path) -> list[dict]:
    table = []
    for r in range(args.rounds):
        round_dir = work / f"round-{r + 1}"
        order = builds(args, round_dir)
        for tool, cmd, produced, log in (order if r % 2 == 0 else order[::-1]):
            log.parent.mkdir(parents=True, exist_ok=True)
            read = warm(args.checkpoint)
            rc, seconds, peak, cpu = run_cpu(cmd, log)
            table.append({"round": r + 1, "tool": tool, "exit": rc, "seconds": seconds, "cpu_seconds": cpu,
                          "peak_rss": peak,
                          "bytes": du(produced), "log": str(log), "read": read})
            print(f"round {r + 1}: {tool}: exit {rc}, {seconds:.1f} s ({cpu:.1f} CPU-s), peak {peak / GIB:.2f} GiB "
                  f"(checkpoint read beforehand in {read:.1f} s)", flush=True)
            if not args.keep:  # this build's output, not its log
                for sub in ("out", "cache"):
                    shutil.rmtree(produced.parent / sub, ignore_errors=True)
    return table


def summary(table: list[dict]) -> str:
    """The medians per tool and vlmforge's ratios to each peer's."""
    tools = list(dict.fromkeys(r["tool"] for r in table))
    med = {t: tuple(statistics.median(r[k] for r in table if r["tool"] == t)
                    for k in ("seconds", "peak_rss", "cpu_seconds")) for t in tools}
    lines = ["| tool | builds | median wall s | median CPU s | median peak RSS GiB |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {sum(r['tool'] == t for r in table)} | {s:.1f} | {c:.1f} | {m / GIB:.2f} |"
              for t, (s, m, c) in med.items()]
    for t in tools[1:]:
        lines.append(f"vlmforge / {t}: time {med['vlmforge'][0] / med[t][0]:.2f}x, "
                     f"CPU time {med['vlmforge'][2] / med[t][2]:.2f}x, peak RSS {med['vlmforge'][1] / med[t][1]:.2f}x")
    return "\n".join(lines)


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
    p.add_argument("--rounds", type=int, default=1, help="builds per tool, the order reversed every other round")
    p.add_argument("--keep", action="store_true")
    p.add_argument("overrides", nargs="*", help="more recipe overrides for the vlmforge build "
                                                 "(e.g. validate.weights=random on a random-weight checkpoint)")
    args = p.parse_args()
    if args.rounds < 1:
        print("error: --rounds must be 1 or more", file=sys.stderr)
        return 2
    if not (args.checkpoint / "config.json").is_file():
        print(f"error: --checkpoint {args.checkpoint} has no config.json; fix: pass a checkpoint folder", file=sys.stderr)
        return 2
    work = Path(args.work)
    if work.is_symlink() or (work.exists() and (not work.is_dir() or any(work.iterdir()))):
        print(f"error: --work {work} exists and is not an empty folder; fix: pass a new folder", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    try:
        table = rows(args, work)
    finally:
        if not args.keep:  # only what this run made: its own subfolders, then the folder if left empty
            for r in range(args.rounds):
                shutil.rmtree(work / f"round-{r + 1}", ignore_errors=True)
            if not any(work.iterdir()):
                work.rmdir()
    print(f"\n{args.checkpoint} ({args.precision}, validate {args.validate})\n")
    print("| round | tool | exit | wall s | CPU s | peak RSS GiB | output GiB |\n|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['round']} | {r['tool']} | {r['exit']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
              f"| {r['peak_rss'] / GIB:.2f} "
              f"| {r['bytes'] / GIB:.2f} |")
    print("\n" + summary(table))
    return 0 if all(r["exit"] == 0 for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
