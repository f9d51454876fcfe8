"""The benchmark's pieces as units, on hand-made rows: the JSON each kind of row writes (the keys and
their order `artifacts/bench.json` has always had), the table, the ratios the targets are read from,
and the bandwidth shares. No model runs here; tests/bench/test_measured.py times the tiny fixture."""

from __future__ import annotations

import pytest

from vlmforge.bench.report import ratios, table_lines
from vlmforge.bench.row import BUILDER, EAGER, GENAI, RUNTIME, ReadRow, Row
from vlmforge.bench.run import add_steps


def _runtime(mode="preallocated", threads=0, decode=100.0, precision="fp32", **kw):
    return Row("runtime", RUNTIME, precision=precision, kv_mode=mode, threads=threads, vision_ms=10.0, ttft_ms=40.0,
               prefill_ms=20.0, decode_tok_s=decode, prompt_tokens=64, **kw)


def _rows(precision="fp32", scale=1.0):
    """One precision's rows as bench_model returns them (no pasts)."""
    return [_runtime("numpy", decode=50.0 * scale, precision=precision), _runtime("ortvalue", decode=80.0 * scale, precision=precision),
            _runtime(decode=100.0 * scale, precision=precision), _runtime(threads=1, decode=90.0 * scale, precision=precision),
            Row("eager", EAGER, precision=precision, vision_ms=20.0, ttft_ms=80.0, decode_tok_s=25.0, threads=2),
            Row("genai", GENAI, precision=precision, step_key=GENAI, ttft_ms=60.0, decode_tok_s=45.0, threads=1,
                note="vision runs inside the first generate step (not separately timed)")]


def test_each_kind_of_row_writes_the_keys_bench_json_has_always_had():
    assert list(_runtime(precision="fp32").to_json()) == [
        "variant", "kv_mode", "threads", "vision_ms", "ttft_ms", "prefill_ms", "decode_tok_s", "prompt_tokens",
        "step_ms_at_past", "precision"]
    eager, genai = _rows()[4:]
    assert list(eager.to_json()) == ["variant", "vision_ms", "ttft_ms", "decode_tok_s", "step_ms_at_past", "threads",
                                     "precision"]
    assert genai.to_json() == {"variant": GENAI, "step_key": GENAI, "vision_ms": None, "ttft_ms": 60.0,
                               "decode_tok_s": 45.0, "step_ms_at_past": {}, "threads": 1,
                               "note": "vision runs inside the first generate step (not separately timed)",
                               "precision": "fp32"}
    builder = Row("builder", f"{BUILDER} INT4", precision="int4_mixed", step_key=BUILDER, prefill_ms=5.0,
                  decode_tok_s=60.0, threads=1, builder_dir="/c/b", note="text decoder only")
    assert list(builder.to_json()) == ["variant", "step_key", "vision_ms", "ttft_ms", "prefill_ms", "decode_tok_s",
                                       "step_ms_at_past", "threads", "builder_dir", "note", "precision"]
    skipped = Row.skip(GENAI, "no genai_config.json")
    skipped.precision = "fp32"
    assert skipped.to_json() == {"variant": GENAI, "skipped": "no genai_config.json", "precision": "fp32"}
    assert list(Row.skip("all", "no recipes/precision/x.yaml", precision="x").to_json()) == ["variant", "precision", "skipped"]
    read = ReadRow("fp32", {256: 2e6}, {"phase 1": {256: 0.5}, "phase 2": {}})
    assert read.to_json() == {"variant": "memory read (the bandwidth limit)", "precision": "fp32", "read_bytes": {256: 2e6},
                              "read_ms_at_past": {"phase 1": {256: 0.5}, "phase 2": {}},
                              "read_gb_s": {"phase 1": {256: 4.0}, "phase 2": {}}}  # 2 MB in 0.5 ms


def test_shares_and_phase_two_keys_follow_the_precision():
    r = _rows()[5]
    add_steps(r, {(GENAI, None, 1): {256: 2.0}, (GENAI, None, "phase 2"): {256: 4.0}},
              {"phase 1": {256: 1.0}, "phase 2": {256: 2.0}}, {256: 1e6}, best=10.0)
    assert list(r.to_json())[-6:] == ["step_ms_at_past_phase2", "precision", "bandwidth_share",
                                      "bandwidth_share_vs_best", "bandwidth_share_phase2", "bandwidth_share_vs_best_phase2"]
    assert r.step_ms_at_past == {256: 2.0} and r.step_ms_at_past_phase2 == {256: 4.0}
    assert r.bandwidth_share == {256: 0.5} and r.bandwidth_share_phase2 == {256: 0.5}  # read ms / step ms, same phase
    assert r.bandwidth_share_vs_best == {256: pytest.approx(1e6 / 10e9 / 2e-3)}


def test_runtime_rows_look_up_their_own_steps_and_phase():
    """All-core runtime rows are timed in phase 1, the runtime at genai's thread count in phase 2."""
    steps = {(RUNTIME, "preallocated", 0): {8: 1.0}, (RUNTIME, "preallocated", 1): {8: 4.0}, (EAGER, None, None): {8: 3.0}}
    reads = {"phase 1": {8: 0.5}, "phase 2": {8: 2.0}}
    allcores, single, eager = _runtime(), _runtime(threads=1), _rows()[4]
    for r in (allcores, single, eager):
        add_steps(r, steps, reads, {8: 100}, best=None)
    assert (allcores.step_ms_at_past, single.step_ms_at_past, eager.step_ms_at_past) == ({8: 1.0}, {8: 4.0}, {8: 3.0})
    assert allcores.bandwidth_share == {8: 0.5} and single.bandwidth_share == {8: 0.5} and eager.bandwidth_share == {8: 0.5 / 3}
    assert allcores.step_ms_at_past_phase2 is None and allcores.bandwidth_share_phase2 == {}
    assert allcores.bandwidth_share_vs_best is None  # no best bandwidth measured: no such key


def test_ratios_compare_like_with_like():
    rows = _rows() + _rows("int4_mixed", scale=2.0) + [Row("builder", f"{BUILDER} INT4", precision="int4_mixed",
                                                           step_key=BUILDER, prefill_ms=10.0, decode_tok_s=120.0, threads=1)]
    r = ratios(rows)
    assert r["fp32: runtime vs PyTorch eager"] == {"decode_tok_s": 4.0, "ttft": 2.0, "vision": 2.0}
    assert r["fp32: runtime vs onnxruntime-genai"] == {"decode_tok_s": 100 / 45, "ttft": 1.5}
    assert r["fp32: runtime vs onnxruntime-genai, same intra-op threads"]["decode_tok_s"] == 90 / 45
    assert r["fp32: IO binding (preallocated) vs numpy session.run"] == {"decode_tok_s": 2.0}
    assert r["int4_mixed vs fp32: runtime"]["decode_tok_s"] == 2.0
    assert r["int4_mixed: runtime vs the onnxruntime-genai builder's model, same intra-op threads"] == {
        "decode_tok_s": 180 / 120, "prefill": 0.5}
    assert "fp32: runtime vs the onnxruntime-genai builder's model, same intra-op threads" not in r  # no fp32 builder


def test_ratios_at_a_past_use_phase_two_times_for_the_same_thread_comparison():
    single = _runtime(threads=1, step_ms_at_past={256: 2.0})
    genai = Row("genai", GENAI, precision="fp32", step_key=GENAI, ttft_ms=60.0, decode_tok_s=45.0, threads=1,
                step_ms_at_past={256: 8.0}, step_ms_at_past_phase2={256: 3.0})
    ours = _runtime(step_ms_at_past={256: 1.0})
    r = ratios([ours, single, genai], (256,))
    assert r["fp32: runtime vs onnxruntime-genai"]["decode_at_past_256"] == 8.0
    assert r["fp32: runtime vs onnxruntime-genai, same intra-op threads"]["decode_at_past_256"] == 1.5
    assert ratios([Row.skip("all", "no recipe", precision="fp32")]) == {}


def test_table_lists_every_row_with_skips_and_the_memory_read():
    rows = _rows()[2:4] + [Row.skip(f"{BUILDER} INT4", "the builder failed (exit 1)"),
                           ReadRow("fp32", {8: 4e6}, {"phase 1": {8: 1.0}, "phase 2": {8: 2.0}})]
    rows[1].step_ms_at_past, rows[1].bandwidth_share = {8: 1.234}, {8: 0.5}
    rows[2].precision = "fp32"
    lines = table_lines("tiny (tiny fixture)", rows, (8,))
    assert lines[:3] == ["\n## tiny (tiny fixture)",
                         "variant | precision | vision ms | TTFT ms | prefill ms | decode tok/s | ms/token @8 | BW share @8",
                         "--- | --- | --- | --- | --- | --- | --- | ---"]
    assert lines[3:] == [
        "vlmforge runtime (KV preallocated) | fp32 | 10.0 | 40.0 | 20.0 | 100.0 | - | -",
        "vlmforge runtime (KV preallocated, 1 thread(s)) | fp32 | 10.0 | 40.0 | 20.0 | 90.0 | 1.23 | 50%",
        "onnxruntime-genai builder INT4 | fp32 | skipped: the builder failed (exit 1)",
        "memory read (the bandwidth limit), phase 1 | fp32 |  |  |  |  | 1.00 | 4.0 GB/s",
        "memory read (the bandwidth limit), phase 2 | fp32 |  |  |  |  | 2.00 | 2.0 GB/s"]
    genai = _rows()[5]
    genai.step_ms_at_past, genai.step_ms_at_past_phase2, genai.bandwidth_share_phase2 = {8: 2.0}, {8: 3.0}, {8: 0.25}
    assert table_lines("t", [genai], (8,))[3:] == [
        "onnxruntime-genai | fp32 | - | 60.0 | - | 45.0 | 2.00 | -",
        "onnxruntime-genai, steps interleaved with the runtime at its thread count |  |  |  |  |  | 3.00 | 25%"]
