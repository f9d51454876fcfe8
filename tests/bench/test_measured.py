"""The benchmark measured on the tiny fixture, short: one artifact set timed by bench_model with decode
steps at a past (the path the mid-size model takes: round-robin steps, memory-read denominators, bandwidth
shares), and `make bench` end to end (build, the onnxruntime-genai builder's INT4 model, the JSON and its
ratios). Both reuse the session's tiny Qwen2.5-VL exports; the pieces are unit-tested in test_report.py."""

from __future__ import annotations

import json

import pytest

from vlmforge.bench import main
from vlmforge.bench.measure import bytes_per_step
from vlmforge.bench.row import EAGER, GENAI, RUNTIME, ReadRow
from vlmforge.bench.run import bench_model


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from vlmforge.fixtures.images import sample_image

    path = tmp_path_factory.mktemp("bench") / "image.png"
    sample_image(1, size=(500, 500)).save(path)
    return str(path)


def test_one_artifact_set_with_steps_at_a_past(qwen25_392, work_dirs, image):
    from vlmforge.artifact.manifest import read_manifest
    from vlmforge.bench.run import ensure_build
    from vlmforge.recipe import recipes_dir

    # the session's build (a cache hit), through the driver's own entry, which also names the HF source
    directory, source = ensure_build([f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}",
                                      "model=tiny_qwen2_5_vl", "vision=small"], recipes_dir(None))
    assert directory == qwen25_392.directory
    manifest = read_manifest(directory)
    bandwidths = [1.0]
    rows = bench_model(directory, source, image, precision="fp32", tokens=4, repeats=1, pasts=(8,), eager=True,
                       bandwidths=bandwidths)
    runtime = [r for r in rows if r.variant == RUNTIME]
    assert {r.kv_mode for r in runtime if not r.threads} == {"numpy", "ortvalue", "preallocated"}
    for r in runtime:
        assert r.decode_tok_s > 0 and r.ttft_ms > r.prefill_ms > 0 and r.vision_ms > 0 and r.prompt_tokens > 0
        assert r.step_ms_at_past[8] > 0 and 0 < r.bandwidth_share[8] and r.bandwidth_share_vs_best[8] > 0
    eager = next(r for r in rows if r.variant == EAGER)
    assert eager.decode_tok_s > 0 and eager.step_ms_at_past[8] > 0
    genai = next(r for r in rows if r.variant == GENAI)
    assert genai.measured and genai.step_ms_at_past[8] > 0 and genai.step_ms_at_past_phase2 is not None
    read = rows[-1]
    assert isinstance(read, ReadRow) and read.read_bytes == {8: bytes_per_step(directory, manifest, 8)}
    assert read.read_ms_at_past["phase 1"][8] > 0 and read.read_gb_s["phase 1"][8] > 0
    assert len(bandwidths) == 2 and bandwidths[1] > 0  # re-measured after the steps
    assert all(r.precision == "fp32" for r in rows)
    json.dumps([r.to_json() for r in rows])  # the JSON holds plain types only


@pytest.mark.slow
def test_make_bench_end_to_end_on_the_tiny_fixture(tmp_path, work_dirs):
    out = tmp_path / "bench.json"
    rc = main(["--skip-mid", "--repeats", "1", "--tokens", "4", "--tiny-tokens", "8", "--out", str(out),
               "--precisions", "int4_mixed,no_such_precision",
               "--set", f"out_dir={tmp_path / 'artifacts'}", "--set", f"cache_dir={work_dirs['cache']}",
               "--set", "vision=small", "--set", "validate=off"])  # the session's FP32 exports, transformed only
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["models"]["tiny"]["rows"]
    by = {(r["variant"], r["precision"], r.get("kv_mode"), r.get("threads")): r for r in rows}
    for mode in ("numpy", "ortvalue", "preallocated"):
        r = by[(RUNTIME, "int4_mixed", mode, 0)]
        assert r["decode_tok_s"] > 0 and r["ttft_ms"] > r["prefill_ms"] > 0 and r["vision_ms"] > 0
    assert by[(GENAI, "int4_mixed", None, 1)]["decode_tok_s"] > 0
    builder = next(r for r in rows if r["variant"] == "onnxruntime-genai builder INT4")
    assert "skipped" not in builder, builder
    assert builder["decode_tok_s"] > 0 and builder["prefill_ms"] > 0
    assert by[("all", "no_such_precision", None, None)]["skipped"] == "no recipes/precision/no_such_precision.yaml"
    ratios = result["models"]["tiny"]["ratios"]
    assert ratios["int4_mixed: runtime vs onnxruntime-genai"]["decode_tok_s"] > 0
    assert "int4_mixed: runtime vs the onnxruntime-genai builder's model, same intra-op threads" in ratios
    assert result["machine"]["read_bandwidth_gb_s"] > 0 and result["tokens"] == {"tiny": 8, "mid": 4}


def test_dynamic_vision_timed_against_the_fixed_graph_and_pytorch(qwen25_dynamic, qwen25_392, work_dirs, capsys):
    """The dynamic graph and the fixed one take the same grid on a square of the fixed size, so their
    features agree; at other sizes it is compared with the PyTorch tower (the numbers `make bench` prints)."""
    from vlmforge.bench.report import print_vision_dynamic
    from vlmforge.bench.run import ensure_build
    from vlmforge.bench.vision import bench_vision_dynamic
    from vlmforge.recipe import recipes_dir

    _, source = ensure_build([f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}",
                              "model=tiny_qwen2_5_vl", "vision=small"], recipes_dir(None))
    v = bench_vision_dynamic(qwen25_dynamic.directory, qwen25_392.directory, source, repeats=1,
                             sizes=((392, 392), (451, 300), (300, 1200)))
    f = v["versus_fixed"]
    assert f["image_size"] == 392 and f["fixed_ms"] > 0 and f["dynamic_ms"] > 0 and f["max_abs_diff"] < 1e-4
    grids = [s["grid_thw"] for s in v["sizes"]]
    assert grids[0] == [1, 28, 28] and grids[1][1:] != grids[2][1:]  # aspect ratio kept, not squashed
    for s in v["sizes"]:
        assert s["patches"] == s["grid_thw"][1] * s["grid_thw"][2] and s["pytorch_ms"] > 0 and s["max_abs_diff"] < 1e-4
    print_vision_dynamic(v)
    assert "dynamic / fixed" in capsys.readouterr().out


def test_bench_of_a_built_set_times_it_as_it_is(qwen25_392, work_dirs, tmp_path):
    """--artifacts DIR --checkpoint CK (how a full-depth build is benched): the set is timed as it is, nothing is
    built; a path that is not a set is the user's mistake (exit 2, no traceback)."""
    import subprocess
    import sys

    from vlmforge.bench.run import ensure_build
    from vlmforge.recipe import recipes_dir

    directory, source = ensure_build([f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}",
                                      "model=tiny_qwen2_5_vl", "vision=small"], recipes_dir(None))
    before = sorted(p.name for p in directory.parent.iterdir())
    out = tmp_path / "bench.json"
    assert main(["--artifacts", str(directory), "--checkpoint", str(source), "--no-builder", "--repeats", "1",
                 "--tokens", "4", "--pasts", "8", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["models"]["artifacts"]
    assert list(json.loads(out.read_text())["models"]) == ["artifacts"] and entry["directory"] == str(directory)
    runtime = [r for r in entry["rows"] if r["variant"] == RUNTIME]
    assert runtime and all(r["step_ms_at_past"]["8"] > 0 and r["precision"] == "fp32" for r in runtime)
    assert any(r["variant"] == GENAI and r["step_ms_at_past"]["8"] > 0 for r in entry["rows"])
    assert sorted(p.name for p in directory.parent.iterdir()) == before
    bad = subprocess.run([sys.executable, "-m", "vlmforge.bench", "--artifacts", str(tmp_path), "--checkpoint",
                          str(source), "--out", str(tmp_path / "b.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not an artifact set" in bad.stderr and "Traceback" not in bad.stderr
