"""The walking skeleton end to end: recipe -> three graphs -> validators vs PyTorch -> manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jsonschema
import onnx
import pytest

from vlmforge.source import fixture_dir
from vlmforge.artifact.manifest import read_manifest, schema, verify_dir

REPO_SCRIPTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "scripts"


def test_build_writes_every_stage_and_a_valid_manifest(qwen25_392):
    d = qwen25_392.directory
    for stage in ("vision", "embedding", "decoder"):
        assert (d / f"{stage}.onnx").is_file()
    m = read_manifest(d)
    jsonschema.validate(m, schema())
    assert m["family"] == "qwen2_5_vl"
    assert m["components"]["vision"]["image_size"] == 392
    assert m["components"]["vision"]["tokens_per_image"] == 196
    assert set(m["files"]) == {p.name for p in d.iterdir() if p.name != "manifest.json"}
    assert m["toolchain"]["packages"]["torch"].startswith("2.13.0")
    assert m["toolchain"]["packages"]["transformers"] == "5.23.0"
    assert len(m["source"]["weights"]) >= 1


def test_build_runs_every_required_check_and_all_pass(qwen25_392):
    checks = read_manifest(qwen25_392.directory)["validation"]["checks"]
    names = {(c["stage"], c["name"]) for c in checks}
    stages = {c["stage"] for c in checks}
    assert {"vision", "embedding", "decoder", "chain", "preprocess"} <= stages
    assert ("embedding", "batch 2, N=0") in names and ("embedding", "batch 2, N>0") in names
    assert any(s == "chain" and n.startswith("text only") for s, n in names)
    assert any(s == "chain" and n.startswith("image + chat prompt") for s, n in names)
    assert all(c["passed"] for c in checks)
    decoder = [c for c in checks if c["stage"] == "decoder"]
    assert all(c["value"] <= 1e-4 for c in decoder)


def test_vision_graph_keeps_image_grid_thw_input_and_fixed_shapes(qwen25_392):
    model = onnx.load(str(qwen25_392.directory / "vision.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"pixel_values": [784, 1176], "image_grid_thw": [1, 3]}


def test_decoder_contract_has_dynamic_dims_and_kv_names(qwen25_392):
    comp = read_manifest(qwen25_392.directory)["components"]["decoder"]
    names = [t["name"] for t in comp["inputs"]]
    assert names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert "past_key_values.2.value" in names
    pos = next(t for t in comp["inputs"] if t["name"] == "position_ids")
    assert pos["shape"] == [3, "batch_size", "sequence_length"]
    outs = [t["name"] for t in comp["outputs"]]
    assert outs[0] == "logits" and "present.2.key" in outs


def test_verify_flags_a_single_changed_byte(qwen25_392, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(qwen25_392.directory, copy)
    assert verify_dir(copy).ok
    data = bytearray((copy / "embedding.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "embedding.onnx").write_bytes(bytes(data))
    report = verify_dir(copy)
    assert not report.ok and report.changed == ["embedding.onnx"]


def test_verify_flags_missing_and_unlisted_files(qwen25_392, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(qwen25_392.directory, copy)
    (copy / "tokenizer.json").unlink()
    (copy / "extra.bin").write_bytes(b"x")
    report = verify_dir(copy)
    assert report.missing == ["tokenizer.json"] and report.unlisted == ["extra.bin"]


def test_build_log_keeps_timings_out_of_the_manifest(qwen25_392):
    text = (qwen25_392.directory / "manifest.json").read_text()
    assert "seconds" not in text
    log = qwen25_392.directory.parent / "logs" / f"{qwen25_392.directory.name}.json"
    assert json.loads(log.read_text())["seconds"]["total"] > 0


def test_independent_script_reproduces_hf_generate(qwen25_392, work_dirs):
    ckpt = fixture_dir(work_dirs["cache"], "qwen2_5_vl")
    run = subprocess.run(
        [sys.executable, str(REPO_SCRIPTS / "independent_check.py"), str(qwen25_392.directory),
         "--checkpoint", str(ckpt), "--tokens", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "32/32 tokens identical" in run.stdout
