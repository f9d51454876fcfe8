"""The benchmarked variants, each timed on the same artifact set: the vlmforge runtime (every KV cache
mode), PyTorch eager (HF `generate` on the source checkpoint), onnxruntime-genai on the artifact set, and
onnxruntime-genai's own model builder on the source checkpoint; plus a stepper per variant (one decode step
per call from a past of a given length) for `run.steps_at_pasts`. Vision timings are in `bench/vision.py`.
The family comes from the registry, read from the checkpoint's architectures."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vlmforge.bench.measure import genai_threads, timed
from vlmforge.bench.row import BUILDER, EAGER, GENAI, RUNTIME, Row
from vlmforge.host.sizes import size_hw

log = logging.getLogger("vlmforge.bench")

PROMPT = "Describe this image in detail."
KV_MODES = ("numpy", "ortvalue", "preallocated")


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


# -- vlmforge runtime ----------------------------------------------------------------------------------------
def bench_runtime(directory: Path, image: str, tokens: int, repeats: int, kv_modes=("preallocated",),
                  threads: int = 0) -> list[Row]:
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
            prep = pipe.prepare(messages, [image], SamplingParams(max_new_tokens=tokens), "bench")
            state = prefill(pipe.engine, [prep.inputs], pipe.ids, max_new_tokens=tokens, kv_mode=mode)
            t = time.perf_counter()
            for _ in range(tokens - 1):
                state.step(np.argmax(state.logits, axis=-1))
            runs[mode]["decode"].append((tokens - 1) / (time.perf_counter() - t))
    prompt_tokens = pipe.last_stats.prompt_tokens
    del pipe
    gc.collect()
    return [Row("runtime", RUNTIME, kv_mode=m, threads=threads, vision_ms=min(r["vision"]) * 1e3,
                ttft_ms=min(r["ttft"]) * 1e3, prefill_ms=min(r["prefill"]) * 1e3, decode_tok_s=max(r["decode"]),
                prompt_tokens=prompt_tokens)
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


def bench_eager(source: Path, image_size, image: str, tokens: int, repeats: int) -> Row:
    import torch
    from transformers import AutoTokenizer

    from vlmforge.host import prompt as P
    from vlmforge.host.preprocess import load_image

    h, w = size_hw(image_size)  # a side or [height, width] (the manifest's image_size)
    model = load_eager(source)
    tok = AutoTokenizer.from_pretrained(str(source))
    proc = _image_processor(source)
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    vision, ttft, decode = [], [], []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            px = proc(images=[load_image(image).resize((w, h))], return_tensors="pt",
                      size={"shortest_edge": h * w, "longest_edge": h * w})
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
            vision.append(timed(lambda: model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])))
        row = Row("eager", EAGER, vision_ms=min(vision) * 1e3, ttft_ms=min(ttft) * 1e3, decode_tok_s=max(decode),
                  threads=torch.get_num_threads())
    del model
    gc.collect()
    return row


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
def bench_genai(directory: Path, image: str, tokens: int, repeats: int) -> Row:
    import onnxruntime_genai as og

    if not (directory / "genai_config.json").is_file():
        return Row.skip(GENAI, "the artifact set has no genai_config.json (not genai-loadable)")
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
    row = Row("genai", GENAI, step_key=GENAI, ttft_ms=min(ttft) * 1e3, decode_tok_s=max(decode), threads=genai_threads(),
              note="vision runs inside the first generate step (not separately timed)")
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


def bench_genai_builder(folder: Path, prompt_tokens: int, tokens: int, repeats: int, precision: str) -> Row:
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
    return Row("builder", f"{BUILDER} {precision.upper()}", step_key=BUILDER, prefill_ms=min(prefill_s) * 1e3,
               decode_tok_s=max(decode), threads=genai_threads(), builder_dir=str(folder),
               note=f"text decoder only (no vision): prefill of {prompt_tokens} random tokens + first token")


