"""Timing primitives of the benchmark: one call timed, steps timed round robin, the machine's read
bandwidth, and the bytes a decode step must read (the numerator of the bandwidth shares)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def timed(fn) -> float:
    """Seconds one call of `fn` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N read bandwidth: torch.sum over a `gib` GiB float32 tensor with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = min(timed(lambda: x.sum()) for _ in range(repeats))
    del x
    return gib * (1 << 30) / best / 1e9


def measure_steps(steppers: dict, steps: int, burst: int = 3) -> dict:
    """Median seconds per step of each stepper, round robin in bursts so that load from other processes
    falls on all of them alike; the first call of each is a warm-up."""
    for step in steppers.values():
        step()
    times: dict = {k: [] for k in steppers}
    for _ in range(0, steps, burst):
        for key, step in steppers.items():
            for _ in range(burst):
                times[key].append(timed(step))
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


def bytes_per_step(directory: Path, manifest: dict, past: int) -> int:
    """Decoder weights (the decoder files' size) + the KV cache read once, at FP32 or the graph's KV dtype."""
    from vlmforge.runtime.artifacts import layout_from_manifest

    lay = layout_from_manifest(manifest, "bench")
    weights = sum(p.stat().st_size for p in Path(directory).glob("decoder.onnx*"))
    kv_bytes = 2 if manifest["components"]["decoder"]["inputs"][0]["dtype"] == "float16" else 4
    return weights + 2 * lay.num_layers * lay.kv_heads * lay.head_dim * past * kv_bytes


def genai_threads() -> int:
    """onnxruntime-genai's intra-op thread count: hardware threads / 2 (at least 1)."""
    return max(1, (os.cpu_count() or 2) // 2)
