"""Build random-weight checkpoints at a real config, at a few depths, and print what each build cost.

    python scripts/scale_check.py                                   (qwen2_5_vl_3b widths, 2 and 4 layers, fp32)
    python scripts/scale_check.py --recipe qwen3_vl_4b --layers 2,8 --precision int4_mixed --vision-layers 4
    make scale-check SCALE_ARGS="--layers 2,4 --vision-layers 2"

Each depth: `vlmforge fixture <recipe> <dir> --layers N --vision-layers M` (streamed bf16 shards), then
`vlmforge export` of it in its own process (validation on unless --validate off), timed with its own
rusage. The table: family, layers, precision, seconds per phase (from the build log), peak RSS of the
build process, disk (artifact set + stage cache), peak RSS / FP32 weight bytes, and the worst FP32
parity figures (max_rel of vision, decoder and chain checks). Everything is written under --work and
removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
GIB = 1 << 30


def run(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, seconds, peak RSS bytes of that process tree) of one child, output to `log`."""
    rc, seconds, peak, _ = run_cpu(cmd, log)
    return rc, seconds, peak


def run_cpu(cmd: list[str], log: Path) -> tuple[int, float, int, float]:
    """run(), plus the CPU seconds (user + system) the child and its waited-for children used."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def du(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def parity(manifest: dict) -> str:
    worst: dict[str, float] = {}
    for c in manifest["validation"]["checks"]:
        if c["metric"] in ("max_rel", "cosine", "mean_cosine") and isinstance(c["value"], (int, float)):
            key = f"{c['stage']} {c['metric']}"
            bad = max if c["metric"] == "max_rel" else min
            worst[key] = bad(worst.get(key, c["value"]), c["value"])
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items()) if k.split()[0] in ("vision", "decoder", "chain"))


def one(args, layers: int, work: Path) -> dict:
    from vlmforge.launch.resources import fp32_weight_bytes

    ck, out, cache = work / f"ck-{layers}", work / f"out-{layers}", work / f"cache-{layers}"
    py = sys.executable
    rc, _, _ = run([py, "-m", "vlmforge.cli", "fixture", args.recipe, str(ck), "--layers", str(layers),
                    "--vision-layers", str(args.vision_layers)], work / f"fixture-{layers}.log")
    if rc:
        sys.exit(f"error: writing the checkpoint failed (exit {rc})\nwhere: {work / f'fixture-{layers}.log'}")
    cmd = [py, "-m", "vlmforge.cli", "export", f"model={args.recipe}", f"model.checkpoint={ck}",
           f"precision={args.precision}", f"vision={args.vision}", f"out_dir={out}", f"cache_dir={cache}", *args.overrides]
    if args.validate == "off":
        cmd.append("validate=off")
    else:  # the checkpoints are random: INT4/FP16 quality gates are sanity bounds there (validate.weights)
        cmd.append("validate.weights=random")
    log = work / f"build-{layers}.log"
    rc, seconds, peak = run(cmd, log)
    row = {"layers": layers, "precision": args.precision, "rc": rc, "seconds": seconds, "peak": peak,
           "fp32": fp32_weight_bytes(ck) or 0, "disk": du(out, cache)}
    logs = sorted(out.glob("*/logs/*.json"))
    row["phases"] = json.loads(logs[0].read_text())["seconds"] if logs else {}
    manifests = sorted(out.glob("*/*/manifest.json"))
    row["parity"] = parity(json.loads(manifests[0].read_text())) if manifests else f"failed: see {log}"
    if not args.keep:
        for p in (ck, out, cache):
            shutil.rmtree(p, ignore_errors=True)
    return row


def table(family: str, rows: list[dict]) -> str:
    head = "| family | layers | precision | seconds per phase | total s | peak RSS GiB | disk GiB | peak / FP32 | parity |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["phases"].items()) if k != "total" and v >= 0.5)
        ratio = r["peak"] / r["fp32"] if r["fp32"] else float("nan")
        lines.append(f"| {family} | {r['layers']} | {r['precision']} | {phases} | {r['seconds']:.0f} | "
                     f"{r['peak'] / GIB:.2f} | {r['disk'] / GIB:.2f} | {ratio:.2f} | {r['parity']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="qwen2_5_vl_3b", help="a public-config model recipe (recipes/model/)")
    p.add_argument("--layers", default="2,4", help="decoder depths, comma separated")
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--vision", default="small")
    p.add_argument("--validate", choices=("on", "off"), default="on")
    p.add_argument("--work", default=str(REPO / ".work" / "scale-check"))
    p.add_argument("--keep", action="store_true", help="keep checkpoints and artifacts")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every build")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        rows.append(one(args, layers, work))
        print(f"{args.recipe} layers={layers}: exit {rows[-1]['rc']}, {rows[-1]['seconds']:.0f} s, "
              f"peak {rows[-1]['peak'] / GIB:.2f} GiB", flush=True)
    print(table(args.recipe, rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
