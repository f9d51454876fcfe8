"""`make bench` end to end on the tiny fixture (the mid-size model is left to the benchmark itself): the
JSON carries every variant with real timings, and the ratios the issue's targets are read from."""

from __future__ import annotations

import json

from vlmforge.bench import main


def test_bench_tiny_writes_rows_and_ratios(tmp_path, work_dirs):
    out = tmp_path / "bench.json"
    rc = main(["--skip-mid", "--repeats", "1", "--tokens", "4", "--tiny-tokens", "8", "--out", str(out),
               "--set", f"out_dir={tmp_path / 'artifacts'}", "--set", f"cache_dir={work_dirs['cache']}"])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["models"]["tiny"]["rows"]
    by = {(r["variant"], r["precision"], r.get("kv_mode"), r.get("threads")): r for r in rows}
    for precision in ("fp32", "int4_mixed"):
        for mode in ("numpy", "ortvalue", "preallocated"):
            r = by[("vlmforge runtime", precision, mode, 0)]
            assert r["decode_tok_s"] > 0 and r["ttft_ms"] > r["prefill_ms"] > 0 and r["vision_ms"] > 0
        assert by[("onnxruntime-genai", precision, None, 1)]["decode_tok_s"] > 0
    eager = next(r for r in rows if r["variant"] == "PyTorch eager")
    assert eager["precision"] == "fp32" and eager["decode_tok_s"] > 0
    builder = next(r for r in rows if r["variant"] == "onnxruntime-genai builder INT4")
    assert "skipped" not in builder, builder
    assert builder["decode_tok_s"] > 0 and builder["prefill_ms"] > 0
    ratios = result["models"]["tiny"]["ratios"]
    assert ratios["fp32: runtime vs PyTorch eager"]["decode_tok_s"] > 0
    assert "int4_mixed: runtime vs the onnxruntime-genai builder's model, same intra-op threads" in ratios
    assert "int4_mixed vs fp32: runtime" in ratios

