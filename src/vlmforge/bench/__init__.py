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

Modules: `row` (the typed rows and their JSON), `variants` (each variant's timing and decode stepper),
`measure` (timing primitives, bandwidth), `report` (table and ratios), `run` (the driver and the command).
"""

from vlmforge.bench.run import main

__all__ = ["main"]
