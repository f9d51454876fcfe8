"""The benchmark's driver: build (or reuse) each artifact set, time every variant on it, and write the
table and `artifacts/bench.json` (see the package docstring for what is measured and how)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vlmforge.bench.measure import bytes_per_step, genai_threads, measure_steps, read_bandwidth_gbs, reader
from vlmforge.bench.report import print_ratios, print_table, print_vision_dynamic, ratios
from vlmforge.bench.row import BUILDER, EAGER, GENAI, READ, RUNTIME, ReadRow, Row
from vlmforge.bench.vision import bench_vision, bench_vision_dynamic
from vlmforge.bench.variants import (KV_MODES, bench_eager, bench_genai, bench_genai_builder, bench_runtime,
                                     eager_stepper, genai_builder, genai_stepper, load_eager,
                                     runtime_stepper)
from vlmforge.recipe import compose, recipes_dir  # the one place the benchmark reads recipes
from vlmforge.host.sizes import size_label

log = logging.getLogger("vlmforge.bench")

DESCRIPTION = ("`make bench` (`python -m vlmforge.bench`): vision ms, time to first token and decode tokens/s of the\n"
               "vlmforge runtime, PyTorch eager (HF `generate`) and onnxruntime-genai on the same artifact sets.")


# -- artifact sets ------------------------------------------------------------------------------------------
def ensure_build(overrides: list[str], recipes: Path) -> tuple[Path, Path]:
    """(artifact directory, source checkpoint folder) of a recipe, built by `run_build` every time: its
    stage cache (keyed by weights, recipe and the exporter code) makes an unchanged set cheap, and a
    changed exporter is never benchmarked through stale graphs."""
    from vlmforge.build import run_build
    from vlmforge.registry import get_family
    from vlmforge.source import open_source

    cfg = compose(overrides, recipes)
    family = get_family(cfg.model.family)
    source = open_source(cfg.model.checkpoint, family.key, cfg.model.revision, Path(cfg.cache_dir), "bench")
    log.info("building %s", " ".join(overrides))
    return run_build(cfg).directory, source.path


def mid_checkpoint(cache_dir: Path, family, layers: int, vision_depth: int) -> Path | None:
    """A random-weight HF folder at the family's public small-model layer widths (written once by the
    family's `write_bench_checkpoint`); None when the family has none."""
    if family.write_bench_checkpoint is None:
        return None
    out = Path(cache_dir) / "bench" / f"{family.key}-3b-shapes-{layers}l-{vision_depth}v"
    if (out / "config.json").is_file():
        return out
    log.info("writing the mid-size checkpoint %s", out)
    return family.write_bench_checkpoint(out, layers, vision_depth)


# -- decode steps at a past ---------------------------------------------------------------------------------
def steps_at_pasts(directory: Path, source: Path, pasts, steps: int, *, eager: bool,
                   builder: Path | None = None, read_bytes: dict | None = None) -> dict:
    """{(variant, kv_mode, threads): {past: ms}}. Phase 1: the runtime (all cores, every KV mode), PyTorch
    eager and genai, interleaved; phase 2: the runtime at genai's thread count against genai again. With
    `read_bytes` ({past: bytes a step reads}), each phase also times reading that much memory
    ((READ, None, "phase 1" / "phase 2")), the denominator of the bandwidth shares."""
    import onnxruntime_genai as og

    from vlmforge.runtime.pipeline import Pipeline

    genai_model = og.Model(str(directory)) if (directory / "genai_config.json").is_file() else None
    genai = {p: genai_stepper(genai_model, p, 3 * steps) for p in pasts} if genai_model else {}
    builder_model = og.Model(str(builder)) if builder else None
    built = {p: genai_stepper(builder_model, p, 3 * steps) for p in pasts} if builder_model else {}
    out: dict = {}
    pipe = Pipeline.load(directory)
    model = load_eager(source) if eager else None
    for past in pasts:
        steppers = {(RUNTIME, m, 0): runtime_stepper(pipe, past, steps, m) for m in KV_MODES}
        if model is not None:
            steppers[(EAGER, None, None)] = eager_stepper(model, past)
        _add_genai(steppers, past, genai, built, read_bytes, 1, "phase 1")
        _time_into(out, steppers, past, steps)
    del pipe, model
    gc.collect()
    threads = genai_threads()
    if threads != (os.cpu_count() or 1):
        pipe = Pipeline.load(directory, threads=threads)
        for past in pasts:
            steppers = {(RUNTIME, "preallocated", threads): runtime_stepper(pipe, past, steps, "preallocated")}
            _add_genai(steppers, past, genai, built, read_bytes, "phase 2", "phase 2")
            _time_into(out, steppers, past, steps)
        del pipe
    del genai, genai_model, built, builder_model
    gc.collect()
    return out


def _add_genai(steppers: dict, past: int, genai: dict, built: dict, read_bytes: dict | None, tag, phase: str) -> None:
    """The genai, genai-builder and memory-read steppers of one phase, under the keys rows look up."""
    if past in genai:
        steppers[(GENAI, None, tag)] = genai[past]
    if past in built:
        steppers[(BUILDER, None, tag)] = built[past]
    if read_bytes:
        steppers[(READ, None, phase)] = reader(read_bytes[past])


def _time_into(out: dict, steppers: dict, past: int, steps: int) -> None:
    for key, sec in measure_steps(steppers, steps).items():
        out.setdefault(key, {})[past] = sec * 1e3


# -- one artifact set ---------------------------------------------------------------------------------------
def bench_model(directory: Path, source: Path, image: str, *, precision: str, tokens: int, repeats: int, pasts=(),
                eager: bool, bandwidths: list[float] | None = None, builder: Path | None = None,
                builder_skip: str = "") -> list:
    """Rows for one artifact set. With `pasts`: decode steps at those past lengths (interleaved across
    variants) and each variant's share of the bandwidth limit: the time to read the bytes a step must
    read (decoder weights + KV cache), measured in the same round robin, over the step's time. The
    best-of read bandwidth in `bandwidths` (re-measured here) gives a second, load-sensitive share."""
    from vlmforge.artifact.manifest import read_manifest

    manifest = read_manifest(directory)
    rows = bench_runtime(directory, image, tokens, repeats, KV_MODES)
    # onnxruntime-genai runs with hardware_concurrency / 2 intra-op threads (1 here): the same setting for us.
    if genai_threads() != (os.cpu_count() or 1):
        rows += bench_runtime(directory, image, tokens, repeats, ("preallocated",), threads=genai_threads())
    if eager:
        rows.append(bench_eager(source, manifest["components"]["vision"]["image_size"], image, tokens, repeats))
    rows.append(bench_genai(directory, image, tokens, repeats))
    if builder is not None:
        rows.append(bench_genai_builder(builder, rows[0].prompt_tokens, tokens, repeats, _base(precision)))
    elif builder_skip:
        rows.append(Row.skip(f"{BUILDER} {_base(precision).upper()}", builder_skip))
    for r in rows:
        r.precision = precision
    if not pasts:
        return rows
    read_bytes = {p: bytes_per_step(directory, manifest, p) for p in pasts}
    steps = steps_at_pasts(directory, source, pasts, tokens, eager=eager, builder=builder, read_bytes=read_bytes)
    reads = {phase: steps.get((READ, None, phase), {}) for phase in ("phase 1", "phase 2")}
    if bandwidths is not None:
        bandwidths.append(read_bandwidth_gbs(os.cpu_count() or 1))
    for r in rows:
        if r.measured:
            add_steps(r, steps, reads, read_bytes, max(bandwidths) if bandwidths else None)
    return rows + [ReadRow(precision, read_bytes, reads)]


def add_steps(r: Row, steps: dict, reads: dict, read_bytes: dict, best: float | None) -> None:
    """A row's decode-step times at each past (genai rows: in both phases) and its bandwidth shares: the
    memory read of the same phase over the step time, and (with `best`, GB/s) the best-of read over it."""
    r.step_ms_at_past = steps.get(r.step_lookup, {})
    if r.step_key is not None:  # genai rows: timed in both phases
        r.step_ms_at_past_phase2 = steps.get((r.step_key, None, "phase 2"), {})
    for suffix in ("", "_phase2"):
        times = getattr(r, f"step_ms_at_past{suffix}") or {}
        phase = "phase 2" if suffix or (r.kind == "runtime" and r.threads) else "phase 1"
        setattr(r, f"bandwidth_share{suffix}", {p: reads[phase][p] / ms for p, ms in times.items()
                                                if ms and reads[phase].get(p)})
        if best:
            setattr(r, f"bandwidth_share_vs_best{suffix}", {p: read_bytes[p] / (best * 1e9) / (ms / 1e3)
                                                            for p, ms in times.items() if ms})


def _base(precision: str) -> str:
    """The builder precision of a recipe name: int4, int4_mixed -> int4; fp32 -> fp32."""
    return "int4" if precision.startswith("int4") else precision


# -- the command --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vlmforge.bench", description=DESCRIPTION)
    ap.add_argument("--out", default="artifacts/bench.json")
    ap.add_argument("--recipes", default=None)
    ap.add_argument("--precisions", default="fp32,int4_mixed",
                    help="comma-separated recipe names under recipes/precision/ (INT4 ones are also compared with "
                         "the onnxruntime-genai builder's INT4 model of the same checkpoint)")
    ap.add_argument("--no-builder", action="store_true", help="skip the onnxruntime-genai builder's models")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per run (mid model)")
    ap.add_argument("--tiny-tokens", type=int, default=256,
                    help="decode steps timed per run on the tiny fixture (a step is ~0.15 ms: 31 steps are noise)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None,
                    help="recipes/model/<name>.yaml to bench (default: the model recipes/build.yaml names); its family "
                         "writes the mid-size checkpoint")
    ap.add_argument("--skip-mid", action="store_true", help="tiny fixture only")
    ap.add_argument("--mid-layers", type=int, default=2, help="decoder layers of the mid model")
    ap.add_argument("--mid-vision-depth", type=int, default=4)
    ap.add_argument("--pasts", default="256,4096")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every build (repeatable), e.g. --set out_dir=/tmp/a --set cache_dir=/tmp/c")
    ap.add_argument("--skip-vision-672", action="store_true",
                    help="skip the 672 px vision timing of the mid model (and the vision=dynamic one, which needs it)")
    ap.add_argument("--artifacts", type=Path, default=None, metavar="DIR",
                    help="bench this built artifact set (e.g. a full-depth build) instead of building the tiny and mid "
                         "models: decode ms/token at --pasts, bandwidth shares, and the onnxruntime-genai builder's "
                         "INT4 model of its checkpoint (--checkpoint) side by side")
    ap.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                    help="with --artifacts: the checkpoint the set was built from (for the builder's model)")
    ap.add_argument("--skip-vision-dynamic", action="store_true",
                    help="skip the vision=dynamic timing of the mid model (vs the 672 px graph and vs PyTorch by size)")
    return ap


@dataclass
class _Session:
    """What every model's measurements share: the parsed options, the recipes, the family and the image."""

    args: argparse.Namespace
    recipes: Path
    family: object
    image: str
    pasts: tuple
    mid: Path | None
    bandwidths: list

    @property
    def model_override(self) -> list[str]:
        return [f"model={self.args.model}"] if self.args.model else []

    def mid_overrides(self) -> list[str]:
        # validate=off: speed, not parity, is measured here (validating at these shapes runs HF
        # eager for minutes; it passes: FP32 max_rel 2e-6 - 3.2e-6, see recipes/validate/standard.yaml).
        return self.model_override + [f"model.checkpoint={self.mid}",
                                      f"model.name=bench-{self.family.key}-3b-shapes-{self.args.mid_layers}l",
                                      "validate=off"]

    @property
    def cache_dir(self) -> Path:
        return Path(compose(self.args.set, self.recipes).cache_dir)


def _precision_rows(s: _Session, model_name: str, precision: str) -> list:
    """One precision's rows of one model (a skipped row when the precision has no recipe)."""
    if not (s.recipes / "precision" / f"{precision}.yaml").is_file():
        return [Row.skip("all", f"no recipes/precision/{precision}.yaml", precision=precision)]
    mid = model_name == "mid"
    overrides = (s.mid_overrides() if mid else s.model_override) + [f"precision={precision}"]
    directory, source = ensure_build(s.args.set + overrides, s.recipes)
    builder, why = None, ""
    if precision.startswith("int4") and not s.args.no_builder:
        builder, why = genai_builder(source, "int4", s.cache_dir)
    return bench_model(directory, source, s.image, precision=precision,
                       tokens=s.args.tokens if mid else s.args.tiny_tokens, repeats=s.args.repeats,
                       pasts=s.pasts if mid else (), eager=precision == "fp32",
                       bandwidths=s.bandwidths if mid else None, builder=builder, builder_skip=why)


def _bench_one(s: _Session, model_name: str) -> dict:
    """Every precision of one model, the ratios, and (mid) the 672 px vision timing; printed and returned."""
    mid = model_name == "mid"
    pasts = s.pasts if mid else ()
    rows = [r for precision in (p for p in s.args.precisions.split(",") if p)
            for r in _precision_rows(s, model_name, precision)]
    r = ratios(rows, pasts)
    entry = {"rows": [row.to_json() for row in rows], "ratios": r}
    if mid and not s.args.skip_vision_672:
        # the vision target is stated at 672 px: the same weights built at vision=large, vision only
        large, src = ensure_build(s.args.set + s.mid_overrides() + ["precision=fp32", "vision=large"], s.recipes)
        entry["vision_672"] = bench_vision(large, src, s.image, s.args.repeats)
        if not s.args.skip_vision_dynamic and s.family.dynamic_vision is not None:
            # the same weights at vision=dynamic: against the 672 px graph, and against PyTorch as pixels grow
            dynamic, _ = ensure_build(s.args.set + s.mid_overrides() + ["precision=fp32", "vision=dynamic"], s.recipes)
            entry["vision_dynamic"] = bench_vision_dynamic(dynamic, large, src, s.args.repeats)
    print_table(f"{model_name} ({'tiny fixture' if not mid else f'{s.family.display_name}-3B shapes, random weights'})",
                rows, pasts)
    print_ratios(r)
    if "vision_672" in entry:
        v = entry["vision_672"]
        print(f"  vision at {size_label(v['image_size'])} px: onnxruntime {v['onnxruntime_ms']:.0f} ms, PyTorch {v['pytorch_ms']:.0f} ms "
              f"(x{v['ratio']:.2f}; features max |diff| {v['max_abs_diff']:.1e})")
    if "vision_dynamic" in entry:
        print_vision_dynamic(entry["vision_dynamic"])
    return entry


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmforge.fixtures.images import sample_image
    from vlmforge.registry import get_family

    recipes = recipes_dir(args.recipes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = str(out.parent / ".bench-image.png")
    sample_image(1, size=(500, 500)).save(image)
    t0 = time.perf_counter()
    bandwidths = [read_bandwidth_gbs(os.cpu_count() or 1)]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "read_bandwidth_gb_s": bandwidths[0],
                          "load_average_at_start": os.getloadavg()},
              "method": "run-level timings are best of --repeats; per-step timings at a past are medians",
              "tokens": {"tiny": args.tiny_tokens, "mid": args.tokens}, "repeats": args.repeats, "models": {}}
    print(f"read bandwidth: {bandwidths[0]:.1f} GB/s ({os.cpu_count()} threads, 1 GiB); "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.artifacts is not None:
        result["models"]["artifacts"] = _bench_artifacts(args, image, tuple(int(p) for p in args.pasts.split(",") if p),
                                                         bandwidths, Path(compose(args.set, recipes).cache_dir))
        return _finish(result, bandwidths, out, t0)
    model_override = [f"model={args.model}"] if args.model else []
    family = get_family(compose(args.set + model_override, recipes).model.family)
    mid = None if args.skip_mid else mid_checkpoint(Path(compose(args.set, recipes).cache_dir), family,
                                                    args.mid_layers, args.mid_vision_depth)
    s = _Session(args, recipes, family, image, tuple(int(p) for p in args.pasts.split(",") if p), mid, bandwidths)
    for model_name in ("tiny",) + (("mid",) if mid else ()):
        result["models"][model_name] = _bench_one(s, model_name)
    return _finish(result, bandwidths, out, t0)


def _finish(result: dict, bandwidths: list, out: Path, t0: float) -> int:
    result["machine"]["read_bandwidth_gb_s_all"] = bandwidths
    result["machine"]["read_bandwidth_gb_s"] = max(bandwidths)
    result["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nread bandwidth measurements (GB/s): {', '.join(f'{b:.1f}' for b in bandwidths)}; shares use the best")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


def _bench_artifacts(args, image: str, pasts: tuple, bandwidths: list, cache_dir: Path) -> dict:
    """--artifacts DIR: one built set as it is (nothing rebuilt), with the builder's INT4 model of --checkpoint
    for an INT4 set. A set or checkpoint that is not there is the user's mistake (exit 2)."""
    from vlmforge.artifact.manifest import read_manifest
    from vlmforge.core.errors import InputError

    directory = Path(args.artifacts)
    if not (directory / "manifest.json").is_file():
        raise InputError(f"{directory} is not an artifact set (no manifest.json)", where="--artifacts",
                          fix="pass the directory a build wrote (out_dir/<model>/<precision>-<size>)")
    if args.checkpoint is None or not (Path(args.checkpoint) / "config.json").is_file():
        raise InputError(f"--checkpoint {args.checkpoint} is not a checkpoint folder (no config.json)",
                          where="--checkpoint", fix="pass the checkpoint the set was built from")
    manifest = read_manifest(directory)
    decoder = manifest["components"]["decoder"]["precision"]  # the row label the tables and ratios use
    precision = "int4_mixed" if decoder == "int4" else decoder
    builder, why = None, ""
    if precision.startswith("int4") and not args.no_builder:
        builder, why = genai_builder(Path(args.checkpoint), "int4", cache_dir)
    rows = bench_model(directory, Path(args.checkpoint), image, precision=precision, tokens=args.tokens,
                       repeats=args.repeats, pasts=pasts, eager=False, bandwidths=bandwidths, builder=builder,
                       builder_skip=why)
    r = ratios(rows, pasts)
    print_table(f"{manifest['recipe']['model']['name']} ({directory}; decoder {decoder})", rows, pasts)
    print_ratios(r)
    return {"directory": str(directory), "rows": [row.to_json() for row in rows], "ratios": r}
