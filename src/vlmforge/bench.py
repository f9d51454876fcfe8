"""`make bench` (`python -m vlmforge.bench`): vision ms, time to first token and decode tokens/s of the
vlmforge runtime, PyTorch eager (HF `generate`) and onnxruntime-genai on the same artifact sets.

Two models, both built by `run_build` (reused when already built):

* the tiny fixture (`model=tiny_qwen2_5_vl`): per-call overheads dominate;
* "mid": random weights with Qwen2.5-VL-3B layer shapes (hidden 2048, 16/2 heads, MLP 11008, vocab 151936
  tied; vision width 1280) and only `--mid-layers` decoder layers / `--mid-vision-depth` vision blocks.
  Decode is also timed at a past of 256 and 4096 tokens (the runtime and eager start from a random cache;
  genai, which cannot be handed a cache, prefills random text in 512-token chunks), and each variant's
  share of the machine's bandwidth limit is reported: (bytes a decode step must read: decoder weights +
  KV cache) / (best read bandwidth measured in this run, before and after the steps) / measured step time.

Timing on a shared machine: run-level numbers (vision, TTFT, decode tokens/s) are best of `--repeats`;
decode steps at a given past are medians, measured round robin across variants in one process (load
from other processes then hits every variant alike). Phase 2 repeats the runtime-vs-genai comparison
with the runtime at genai's own intra-op thread count (hardware threads / 2).

The runtime's KV cache modes (`numpy` = plain session.run, the "before IO binding" baseline; `ortvalue`;
`preallocated`, the default) are timed side by side. Precisions: `--precisions fp32,int4` adds rows per
recipe `recipes/precision/<name>.yaml` that exists (PyTorch eager stays FP32: it is the reference).
Results: a table on stdout and `artifacts/bench.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("vlmforge.bench")

PROMPT = "Describe this image in detail."
KV_MODES = ("numpy", "ortvalue", "preallocated")


# -- artifact sets ------------------------------------------------------------------------------------------
def ensure_build(overrides: list[str], recipes: Path) -> tuple[Path, Path]:
    """(artifact directory, source checkpoint folder) of a recipe, built by `run_build` every time: its
    stage cache (keyed by weights, recipe and the exporter code) makes an unchanged set cheap, and a
    changed exporter is never benchmarked through stale graphs."""
    from vlmforge.build import run_build
    from vlmforge.recipe import compose
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


def source_family(source: Path):
    """The family of a checkpoint folder, from its config.json architectures (the registry decides)."""
    from vlmforge.registry import family_for_architecture

    archs = json.loads((Path(source) / "config.json").read_text()).get("architectures") or []
    family = next((f for a in archs if (f := family_for_architecture(a))), None)
    if family is None:
        from vlmforge.core.errors import CheckpointError

        raise CheckpointError(f"no registered family has architecture {archs}", where=f"{source}/config.json",
                              fix="bench a checkpoint of a family listed in vlmforge/families/__init__.py")
    return family


def _hf_class(source: Path):
    import transformers

    return getattr(transformers, source_family(source).hf_class)


def _image_processor(source: Path):
    import transformers

    return getattr(transformers, source_family(source).image.processor_class).from_pretrained(str(source))


# -- machine facts --------------------------------------------------------------------------------------------
def read_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N read bandwidth: torch.sum over a `gib` GiB float32 tensor with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    del x
    return gib * (1 << 30) / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- vlmforge runtime ---------------------------------------------------------------------------------------------
def bench_runtime(directory: Path, image: str, tokens: int, repeats: int, kv_modes=("preallocated",),
                  threads: int = 0) -> list[dict]:
    """One row per KV mode; the modes are interleaved run by run so that load from other processes hits
    them alike."""
    from vlmforge.runtime.loop import prefill
    from vlmforge.runtime.pipeline import Pipeline, SamplingParams

    pipe = Pipeline.load(directory, threads=threads)
    runs = {m: {"vision": [], "ttft": [], "prefill": [], "decode": []} for m in kv_modes}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    for _ in range(repeats):
        for mode in kv_modes:
            pipe.kv_mode = mode
            list(pipe.stream(PROMPT, [image], max_new_tokens=1))
            runs[mode]["vision"].append(pipe.last_stats.vision_s)
            runs[mode]["ttft"].append(pipe.last_stats.ttft_s)
            runs[mode]["prefill"].append(pipe.last_stats.prefill_s)
            prep = pipe._prepare(messages, [image], SamplingParams(max_new_tokens=tokens), "bench")
            state = prefill(pipe.engine, [prep.inputs], pipe.ids, max_new_tokens=tokens, kv_mode=mode)
            t = time.perf_counter()
            for _ in range(tokens - 1):
                state.step(np.argmax(state.logits, axis=-1))
            runs[mode]["decode"].append((tokens - 1) / (time.perf_counter() - t))
    prompt_tokens = pipe.last_stats.prompt_tokens
    del pipe
    gc.collect()
    return [{"variant": "vlmforge runtime", "kv_mode": m, "threads": threads, "vision_ms": min(r["vision"]) * 1e3,
             "ttft_ms": min(r["ttft"]) * 1e3, "prefill_ms": min(r["prefill"]) * 1e3, "decode_tok_s": max(r["decode"]),
             "prompt_tokens": prompt_tokens, "step_ms_at_past": {}}
            for m, r in runs.items()]


def runtime_stepper(pipe, past: int, steps: int, mode: str):
    """One decode step (embedding + decoder) per call, from a random cache of `past` tokens."""
    from vlmforge.runtime.kv import BoundDecoder

    lay = pipe.engine.layout
    rng = np.random.default_rng(0)
    cache = [rng.standard_normal((1, lay.kv_heads, past, lay.head_dim), dtype=np.float32) * 0.5
             for _ in range(2 * lay.num_layers)]
    dec = BoundDecoder(pipe.engine.decoder, lay, batch=1, capacity=past + steps + 8, mode=mode)
    dec.load_past(cache)

    def step() -> None:
        n = dec.past_len
        embeds, _ = pipe.engine.embed(np.array([[7 + n % 300]], np.int64), None, None)
        dec.run(embeds, np.ones((1, n + 1), np.int64), np.full((3, 1, 1), n, np.int64), None)

    return step


# -- PyTorch eager (HF generate) ---------------------------------------------------------------------------------------
class _Stamps:
    """A generate() streamer that timestamps every new token (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def load_eager(source: Path):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return _hf_class(source).from_pretrained(str(source), dtype=torch.float32).eval()


def bench_eager(source: Path, image_size: int, image: str, tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from vlmforge.host import prompt as P
    from vlmforge.host.preprocess import load_image

    model = load_eager(source)
    tok = AutoTokenizer.from_pretrained(str(source))
    proc = _image_processor(source)
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    vision, ttft, decode = [], [], []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            px = proc(images=[load_image(image).resize((image_size, image_size))], return_tensors="pt",
                      size={"shortest_edge": image_size**2, "longest_edge": image_size**2})
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
            ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
            ids = P.expand_image_tokens(ids, P.image_token_counts(px["image_grid_thw"].numpy(), merge), cfg.image_token_id)
            ids = torch.tensor([ids])
            kw = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                      mm_token_type_ids=torch.from_numpy(P.mm_token_type_ids(ids.numpy(), cfg.image_token_id)))
            stamps = _Stamps()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, streamer=stamps, **kw)
            ttft.append(stamps.times[0] - start)
            decode.append((len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0]))
            vision.append(_timed(lambda: model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])))
        row = {"variant": "PyTorch eager", "vision_ms": min(vision) * 1e3, "ttft_ms": min(ttft) * 1e3,
               "decode_tok_s": max(decode), "step_ms_at_past": {}, "threads": torch.get_num_threads()}
    del model
    gc.collect()
    return row


def bench_vision(directory: Path, source: Path, image: str, repeats: int) -> dict:
    """The vision graph through onnxruntime (all cores) vs the PyTorch vision tower
    (`get_image_features`), on the same pixel values from HF's image processor, alternating run by run;
    best of `repeats` each, and the largest difference between their features."""
    import torch

    from vlmforge.artifact.manifest import read_manifest
    from vlmforge.runtime.engine import Graph
    from vlmforge.host.preprocess import load_image

    size = read_manifest(directory)["components"]["vision"]["image_size"]
    proc = _image_processor(source)
    px = proc(images=[load_image(image).resize((size, size))], return_tensors="pt",
              size={"shortest_edge": size**2, "longest_edge": size**2})
    model = load_eager(source)
    graph = Graph(directory / "vision.onnx")
    feeds = {"pixel_values": px["pixel_values"].numpy(), "image_grid_thw": px["image_grid_thw"].numpy()}
    ort_s, torch_s = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first round is a warm-up
            t = _timed(lambda: graph.run(feeds))
            u = _timed(lambda: model.model.get_image_features(px["pixel_values"], px["image_grid_thw"]))
            if i:
                ort_s.append(t)
                torch_s.append(u)
        ours = graph.run(feeds)["image_features"]
        ref = model.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        ref = torch.cat(list(ref), 0) if isinstance(ref, (list, tuple)) else ref
    del model, graph
    gc.collect()
    return {"image_size": size, "onnxruntime_ms": min(ort_s) * 1e3, "pytorch_ms": min(torch_s) * 1e3,
            "ratio": min(torch_s) / min(ort_s), "max_abs_diff": float(np.max(np.abs(ours - ref.float().numpy())))}


def eager_stepper(model, past: int):
    """One decode step of the HF model per call, from a random DynamicCache of `past` tokens."""
    import torch
    from transformers import DynamicCache

    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache(config=model.config)
    for layer in range(tc.num_hidden_layers):
        k = torch.randn(1, tc.num_key_value_heads, past, head_dim, generator=g) * 0.5
        cache.update(k, torch.randn_like(k) * 0.5, layer)
    n = [past]

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[7 + n[0] % 300]]), attention_mask=torch.ones(1, n[0] + 1, dtype=torch.long),
                  position_ids=torch.full((3, 1, 1), n[0], dtype=torch.long), past_key_values=cache, use_cache=True)
        n[0] += 1

    return step


# -- onnxruntime-genai --------------------------------------------------------------------------------------------------
def bench_genai(directory: Path, image: str, tokens: int, repeats: int) -> dict:
    import onnxruntime_genai as og

    if not (directory / "genai_config.json").is_file():
        return {"variant": "onnxruntime-genai", "skipped": "the artifact set has no genai_config.json (not genai-loadable)"}
    model = og.Model(str(directory))
    proc = model.create_multimodal_processor()
    tok = og.Tokenizer(model)
    msgs = json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}])
    ttft, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        inputs = proc(tok.apply_chat_template(msgs, add_generation_prompt=True), images=og.Images.open(image))
        n = inputs["input_ids"].as_numpy().shape[1]
        processed = time.perf_counter() - start
        first_s, tok_s = _genai_generate(model, n + tokens, tokens, lambda gen: gen.set_inputs(inputs))
        ttft.append(processed + first_s)
        decode.append(tok_s)
    row = {"variant": "onnxruntime-genai", "step_key": "onnxruntime-genai", "vision_ms": None, "ttft_ms": min(ttft) * 1e3,
           "decode_tok_s": max(decode), "step_ms_at_past": {},
           "threads": max(1, (os.cpu_count() or 2) // 2),
           "note": "vision runs inside the first generate step (not separately timed)"}
    del model
    gc.collect()
    return row


def _genai_generate(model, total: int, tokens: int, feed) -> tuple[float, float]:
    """A genai generator forced to `total` tokens: `feed(gen)` hands it the prompt. Returns (seconds from
    the feed to the first token, decode tokens/s over the remaining `tokens - 1`)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    feed(gen)
    gen.generate_next_token()
    first = time.perf_counter()
    for _ in range(tokens - 1):
        gen.generate_next_token()
    return first - start, (tokens - 1) / (time.perf_counter() - first)


def genai_stepper(model, past: int, steps: int):
    """One generate_next_token per call after a chunked prefill of `past` random tokens (genai cannot be
    handed a cache)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = past + steps + 8
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    rng = np.random.default_rng(0)
    for a in range(0, past, 512):
        gen.append_tokens(rng.integers(0, 400, min(512, past - a)).astype(np.int32))
    return gen.generate_next_token


def genai_builder(source: Path, precision: str, cache_dir: Path) -> tuple[Path | None, str]:
    """onnxruntime-genai's own model builder run on the source checkpoint (`-p int4 -e cpu`, its defaults:
    block 32, accuracy level 4, GroupQueryAttention, quantized tied embedding / LM head). For Qwen2.5-VL
    it builds the text decoder only (type `qwen2_5_vl_text`, token ids in). Built once per source and
    onnxruntime-genai version; (folder, "") or (None, why not)."""
    import subprocess

    import onnxruntime_genai as og

    out = Path(cache_dir) / "bench" / "genai-builder" / f"{Path(source).name}-{precision}-{og.__version__}"
    if (out / "genai_config.json").is_file():
        return out, ""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    log_file = out.with_name(out.name + ".log")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
    log.info("building the onnxruntime-genai builder's %s model (log: %s)", precision, log_file)
    with open(log_file, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not (tmp / "genai_config.json").is_file():
        return None, f"the builder failed (exit {rc}); see {log_file}"
    tmp.rename(out)
    return out, ""


def bench_genai_builder(folder: Path, prompt_tokens: int, tokens: int, repeats: int, precision: str) -> dict:
    """Prefill of `prompt_tokens` random text tokens (the length of the runtime's image prompt; the
    builder's Qwen2.5-VL model has no vision), then `tokens` decode steps."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    rng = np.random.default_rng(0)
    prefill_s, decode = [], []
    for _ in range(repeats):
        prompt = rng.integers(0, 400, prompt_tokens).astype(np.int32)
        first_s, tok_s = _genai_generate(model, prompt_tokens + tokens, tokens, lambda gen: gen.append_tokens(prompt))
        prefill_s.append(first_s)
        decode.append(tok_s)
    del model
    gc.collect()
    return {"variant": f"onnxruntime-genai builder {precision.upper()}", "step_key": "onnxruntime-genai builder",
            "vision_ms": None, "ttft_ms": None,
            "prefill_ms": min(prefill_s) * 1e3, "decode_tok_s": max(decode), "step_ms_at_past": {},
            "threads": max(1, (os.cpu_count() or 2) // 2), "builder_dir": str(folder),
            "note": f"text decoder only (no vision): prefill of {prompt_tokens} random tokens + first token"}


def measure_steps(steppers: dict, steps: int, burst: int = 3) -> dict:
    """Median seconds per step of each stepper, round robin in bursts so that load from other processes
    falls on all of them alike; the first call of each is a warm-up."""
    for step in steppers.values():
        step()
    times: dict = {k: [] for k in steppers}
    for _ in range(0, steps, burst):
        for key, step in steppers.items():
            for _ in range(burst):
                times[key].append(_timed(step))
    return {k: statistics.median(v) for k, v in times.items()}


def reader(nbytes: int):
    """A stepper that reads `nbytes` of memory once (torch.sum over float32, all cores): the machine's
    bandwidth limit for a step that must read that many bytes, timed in the same round robin as the steps."""
    import torch

    x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)

    def step() -> None:
        torch.set_num_threads(os.cpu_count() or 1)
        x.sum()

    return step


def steps_at_pasts(directory: Path, source: Path, pasts, steps: int, *, eager: bool,
                   builder: Path | None = None, read_bytes: dict | None = None) -> dict:
    """{(variant, kv_mode, threads): {past: ms}}. Phase 1: the runtime (all cores, every KV mode), PyTorch
    eager and genai, interleaved; phase 2: the runtime at genai's thread count against genai again. With
    `read_bytes` ({past: bytes a step reads}), each phase also times reading that much memory
    (("memory read", None, "phase 1" / "phase 2")), the denominator of the bandwidth shares."""
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
        steppers = {("vlmforge runtime", m, 0): runtime_stepper(pipe, past, steps, m) for m in KV_MODES}
        if model is not None:
            steppers[("PyTorch eager", None, None)] = eager_stepper(model, past)
        if past in genai:
            steppers[("onnxruntime-genai", None, 1)] = genai[past]
        if past in built:
            steppers[("onnxruntime-genai builder", None, 1)] = built[past]
        if read_bytes:
            steppers[("memory read", None, "phase 1")] = reader(read_bytes[past])
        for key, sec in measure_steps(steppers, steps).items():
            out.setdefault(key, {})[past] = sec * 1e3
    del pipe, model
    gc.collect()
    threads = max(1, (os.cpu_count() or 2) // 2)
    if threads != (os.cpu_count() or 1):
        pipe = Pipeline.load(directory, threads=threads)
        for past in pasts:
            steppers = {("vlmforge runtime", "preallocated", threads): runtime_stepper(pipe, past, steps, "preallocated")}
            if past in genai:
                steppers[("onnxruntime-genai", None, "phase 2")] = genai[past]
            if past in built:
                steppers[("onnxruntime-genai builder", None, "phase 2")] = built[past]
            if read_bytes:
                steppers[("memory read", None, "phase 2")] = reader(read_bytes[past])
            for key, sec in measure_steps(steppers, steps).items():
                out.setdefault(key, {})[past] = sec * 1e3
        del pipe
    del genai, genai_model, built, builder_model
    gc.collect()
    return out


# -- report -------------------------------------------------------------------------------------------------------------
def bytes_per_step(directory: Path, manifest: dict, past: int) -> int:
    """Decoder weights (the decoder files' size) + the KV cache read once, at FP32 or the graph's KV dtype."""
    from vlmforge.runtime.pipeline import layout_from_manifest

    lay = layout_from_manifest(manifest, "bench")
    weights = sum(p.stat().st_size for p in directory.glob("decoder.onnx*"))
    kv_bytes = 2 if manifest["components"]["decoder"]["inputs"][0]["dtype"] == "float16" else 4
    return weights + 2 * lay.num_layers * lay.kv_heads * lay.head_dim * past * kv_bytes


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(title: str, rows: list[dict], pasts=()) -> None:
    print(f"\n## {title}")
    head = ["variant", "precision", "vision ms", "TTFT ms", "prefill ms", "decode tok/s"]
    for p in pasts:
        head += [f"ms/token @{p}", f"BW share @{p}"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']} | {r.get('precision', '')} | skipped: {r['skipped']}")
            continue
        if "read_ms_at_past" in r:  # the denominator of the shares, per phase: ms (GB/s)
            for phase, times in r["read_ms_at_past"].items():
                cells = [f"{r['variant']}, {phase}", r["precision"], "", "", "", ""]
                for p in pasts:
                    ms, gbs = times.get(p), r["read_gb_s"][phase].get(p)
                    cells += [_fmt(ms, ".2f"), f"{gbs:.1f} GB/s" if gbs else "-"]
                print(" | ".join(cells))
            continue
        name = r["variant"] + (f" (KV {r['kv_mode']}" + (f", {r['threads']} thread(s))" if r.get("threads") else ")")
                               if "kv_mode" in r else "")
        cells = [name, r.get("precision", ""), _fmt(r.get("vision_ms")), _fmt(r.get("ttft_ms")), _fmt(r.get("prefill_ms")),
                 _fmt(r["decode_tok_s"])]
        for p in pasts:
            cells += [_fmt(r["step_ms_at_past"].get(p), ".2f"), _fmt(r.get("bandwidth_share", {}).get(p), ".0%")]
        print(" | ".join(cells))
        if r.get("step_ms_at_past_phase2"):
            cells = [f"{name}, steps interleaved with the runtime at its thread count", "", "", "", "", ""]
            for p in pasts:
                cells += [_fmt(r["step_ms_at_past_phase2"].get(p), ".2f"),
                          _fmt(r.get("bandwidth_share_phase2", {}).get(p), ".0%")]
            print(" | ".join(cells))


def _ratio(ours: dict, ref: dict, pasts, with_ttft: bool = True) -> dict:
    """ref time / our time (> 1: ours is faster), for every quantity both rows have."""
    entry = {"decode_tok_s": ours["decode_tok_s"] / ref["decode_tok_s"]}
    if with_ttft:
        for key, name in (("ttft_ms", "ttft"), ("prefill_ms", "prefill"), ("vision_ms", "vision")):
            if ours.get(key) and ref.get(key):
                entry[name] = ref[key] / ours[key]
    for p in pasts:
        a, b = ours["step_ms_at_past"].get(p), ref["step_ms_at_past"].get(p)
        if a and b:
            entry[f"decode_at_past_{p}"] = b / a
    return entry


def ratios(rows: list[dict], pasts=()) -> dict:
    """Per precision: the runtime (preallocated KV, all cores) vs eager and vs genai on the same artifacts,
    the runtime at genai's thread count vs genai and vs the genai builder's own model, and the IO-binding
    KV cache vs plain session.run; plus each lower precision's speed-up over FP32."""
    def pick(precision, variant, kv_mode="preallocated", threads=0):
        for r in rows:
            if r["variant"] != variant or r.get("precision") != precision or "skipped" in r:
                continue
            if variant != "vlmforge runtime" or (r["kv_mode"] == kv_mode and r["threads"] == threads):
                return r
        return None

    def phase2(r):
        return dict(r, step_ms_at_past=r.get("step_ms_at_past_phase2") or r["step_ms_at_past"]) if r else None

    out = {}
    precisions = list(dict.fromkeys(r.get("precision") for r in rows if "skipped" not in r))
    for precision in precisions:
        ours, eager, genai = (pick(precision, v) for v in ("vlmforge runtime", "PyTorch eager", "onnxruntime-genai"))
        builder = next((r for r in rows if r["variant"].startswith("onnxruntime-genai builder")
                        and r.get("precision") == precision and "skipped" not in r), None)
        single = next((r for r in rows if r["variant"] == "vlmforge runtime" and r.get("threads")
                       and r.get("precision") == precision), None)
        pairs = {"runtime vs PyTorch eager": (ours, eager), "runtime vs onnxruntime-genai": (ours, genai),
                 "runtime vs onnxruntime-genai, same intra-op threads": (single, phase2(genai)),
                 "runtime vs the onnxruntime-genai builder's model, same intra-op threads": (single, phase2(builder))}
        for name, (a, b) in pairs.items():
            if a and b:
                out[f"{precision}: {name}"] = _ratio(a, b, pasts)
        base = pick(precision, "vlmforge runtime", kv_mode="numpy")
        if ours and base:
            out[f"{precision}: IO binding (preallocated) vs numpy session.run"] = _ratio(ours, base, pasts, with_ttft=False)
        fp32 = pick("fp32", "vlmforge runtime")
        if precision != "fp32" and ours and fp32:
            out[f"{precision} vs fp32: runtime"] = _ratio(ours, fp32, pasts)
    return out


def print_ratios(r: dict) -> None:
    for name, entry in r.items():
        print(f"  {name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in entry.items()))


# -- driver -------------------------------------------------------------------------------------------------------------
def bench_model(directory: Path, source: Path, image: str, *, precision: str, tokens: int, repeats: int, pasts=(),
                eager: bool, bandwidths: list[float] | None = None, builder: Path | None = None,
                builder_skip: str = "") -> list[dict]:
    """Rows for one artifact set. With `pasts`: decode steps at those past lengths (interleaved across
    variants) and each variant's share of the bandwidth limit: the time to read the bytes a step must
    read (decoder weights + KV cache), measured in the same round robin, over the step's time. The
    best-of read bandwidth in `bandwidths` (re-measured here) gives a second, load-sensitive share."""
    from vlmforge.artifact.manifest import read_manifest

    manifest = read_manifest(directory)
    size = manifest["components"]["vision"]["image_size"]
    rows = bench_runtime(directory, image, tokens, repeats, KV_MODES)
    # onnxruntime-genai runs with hardware_concurrency / 2 intra-op threads (1 here): the same setting for us.
    genai_threads = max(1, (os.cpu_count() or 2) // 2)
    if genai_threads != (os.cpu_count() or 1):
        rows += bench_runtime(directory, image, tokens, repeats, ("preallocated",), threads=genai_threads)
    if eager:
        rows.append(bench_eager(source, size, image, tokens, repeats))
    rows.append(bench_genai(directory, image, tokens, repeats))
    if builder is not None:
        rows.append(bench_genai_builder(builder, rows[0]["prompt_tokens"], tokens, repeats, _base(precision)))
    elif builder_skip:
        rows.append({"variant": f"onnxruntime-genai builder {_base(precision).upper()}", "skipped": builder_skip})
    if pasts:
        read_bytes = {p: bytes_per_step(directory, manifest, p) for p in pasts}
        steps = steps_at_pasts(directory, source, pasts, tokens, eager=eager, builder=builder, read_bytes=read_bytes)
        reads = {phase: steps.get(("memory read", None, phase), {}) for phase in ("phase 1", "phase 2")}
        for r in rows:
            if "skipped" in r:
                continue
            if "step_key" in r:  # genai rows: timed in both phases
                r["step_ms_at_past"] = steps.get((r["step_key"], None, 1), {})
                r["step_ms_at_past_phase2"] = steps.get((r["step_key"], None, "phase 2"), {})
            else:
                key = (r["variant"], r.get("kv_mode"), r.get("threads") if r["variant"] == "vlmforge runtime" else None)
                r["step_ms_at_past"] = steps.get(key, {})
        if bandwidths is not None:
            bandwidths.append(read_bandwidth_gbs(os.cpu_count() or 1))
    best = max(bandwidths) if bandwidths else None
    for r in rows:
        r["precision"] = precision
        if "skipped" in r or not pasts:
            continue
        for suffix in ("", "_phase2"):
            times = r.get(f"step_ms_at_past{suffix}") or {}
            phase = "phase 2" if suffix or (r["variant"] == "vlmforge runtime" and r.get("threads")) else "phase 1"
            r[f"bandwidth_share{suffix}"] = {p: reads[phase][p] / ms for p, ms in times.items()
                                             if ms and reads[phase].get(p)}
            if best:
                r[f"bandwidth_share_vs_best{suffix}"] = {p: read_bytes[p] / (best * 1e9) / (ms / 1e3)
                                                         for p, ms in times.items() if ms}
    if pasts:
        rows.append({"variant": "memory read (the bandwidth limit)", "precision": precision,
                     "read_bytes": read_bytes, "read_ms_at_past": reads,
                     "read_gb_s": {ph: {p: read_bytes[p] / (ms / 1e3) / 1e9 for p, ms in v.items()}
                                   for ph, v in reads.items()}})
    return rows


def _base(precision: str) -> str:
    """The builder precision of a recipe name: int4, int4_mixed -> int4; fp32 -> fp32."""
    return "int4" if precision.startswith("int4") else precision


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmforge.bench", description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--skip-vision-672", action="store_true", help="skip the 672 px vision timing of the mid model")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmforge.recipe import compose, recipes_dir
    from vlmforge.fixtures.images import sample_image

    recipes = recipes_dir(args.recipes)
    pasts = tuple(int(p) for p in args.pasts.split(",") if p)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = str(out.parent / ".bench-image.png")
    sample_image(1, size=(500, 500)).save(image)
    t0 = time.perf_counter()
    bandwidths = [read_bandwidth_gbs(os.cpu_count() or 1)]
    bandwidth = bandwidths[0]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "read_bandwidth_gb_s": bandwidth,
                          "load_average_at_start": os.getloadavg()},
              "method": "run-level timings are best of --repeats; per-step timings at a past are medians",
              "tokens": {"tiny": args.tiny_tokens, "mid": args.tokens}, "repeats": args.repeats, "models": {}}
    print(f"read bandwidth: {bandwidth:.1f} GB/s ({os.cpu_count()} threads, 1 GiB); load average {os.getloadavg()[0]:.2f}")
    precisions = [p for p in args.precisions.split(",") if p]
    from vlmforge.registry import get_family

    model_override = [f"model={args.model}"] if args.model else []
    family = get_family(compose(args.set + model_override, recipes).model.family)
    mid = None if args.skip_mid else mid_checkpoint(Path(compose(args.set, recipes).cache_dir), family,
                                                    args.mid_layers, args.mid_vision_depth)
    for model_name in ("tiny",) + (("mid",) if mid else ()):
        rows: list[dict] = []
        for precision in precisions:
            if not (recipes / "precision" / f"{precision}.yaml").is_file():
                rows.append({"variant": "all", "precision": precision, "skipped": f"no recipes/precision/{precision}.yaml"})
                continue
            overrides = model_override + [f"precision={precision}"]
            if model_name == "mid":
                # validate=off: speed, not parity, is measured here (validating at these shapes runs HF
                # eager for minutes; it passes: FP32 max_rel 2e-6 - 3.2e-6, see recipes/validate/standard.yaml).
                mid_overrides = model_override + [f"model.checkpoint={mid}",
                                                  f"model.name=bench-{family.key}-3b-shapes-{args.mid_layers}l", "validate=off"]
                overrides = mid_overrides + [f"precision={precision}"]
            directory, source = ensure_build(args.set + overrides, recipes)
            builder, why = None, ""
            if precision.startswith("int4") and not args.no_builder:
                builder, why = genai_builder(source, "int4", Path(compose(args.set, recipes).cache_dir))
            tokens = args.tiny_tokens if model_name == "tiny" else args.tokens
            rows += bench_model(directory, source, image, precision=precision, tokens=tokens, repeats=args.repeats,
                                pasts=pasts if model_name == "mid" else (), eager=precision == "fp32",
                                bandwidths=bandwidths if model_name == "mid" else None, builder=builder,
                                builder_skip=why)
        r = ratios(rows, pasts if model_name == "mid" else ())
        result["models"][model_name] = {"rows": rows, "ratios": r}
        if model_name == "mid" and not args.skip_vision_672:
            # the vision target is stated at 672 px: the same weights built at vision=large, vision only
            large, src = ensure_build(args.set + mid_overrides + ["precision=fp32", "vision=large"], recipes)
            result["models"][model_name]["vision_672"] = vision = bench_vision(large, src, image, args.repeats)
        print_table(f"{model_name} ({'tiny fixture' if model_name == 'tiny' else f'{family.display_name}-3B shapes, random weights'})",
                    rows, pasts if model_name == "mid" else ())
        print_ratios(r)
        if "vision_672" in result["models"][model_name]:
            v = result["models"][model_name]["vision_672"]
            print(f"  vision at {v['image_size']} px: onnxruntime {v['onnxruntime_ms']:.0f} ms, PyTorch {v['pytorch_ms']:.0f} ms "
                  f"(x{v['ratio']:.2f}; features max |diff| {v['max_abs_diff']:.1e})")
    result["machine"]["read_bandwidth_gb_s_all"] = bandwidths
    result["machine"]["read_bandwidth_gb_s"] = max(bandwidths)
    result["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nread bandwidth measurements (GB/s): {', '.join(f'{b:.1f}' for b in bandwidths)}; shares use the best")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
