"""Qwen3-VL with DeepStack carried through every stage, and the DeepStack-free variant."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from vlmforge.source import fixture_dir
from vlmforge.artifact.manifest import read_manifest, verify_dir
from tests.conftest import REPO
from tests.test_cli_errors import assert_clean_failure, run_cli


def _names(comp, kind):
    return [t["name"] for t in comp[kind]]


def test_deepstack_flows_through_every_contract(qwen3_384):
    m = read_manifest(qwen3_384.directory)
    c = m["components"]
    assert _names(c["vision"], "outputs") == ["image_features", "deepstack_features"]
    assert _names(c["embedding"], "inputs") == ["input_ids", "image_features", "deepstack_features"]
    assert _names(c["embedding"], "outputs") == ["inputs_embeds", "deepstack_embeds"]
    assert "deepstack_embeds" in _names(c["decoder"], "inputs")
    ds = next(t for t in c["decoder"]["inputs"] if t["name"] == "deepstack_embeds")
    assert ds["shape"][0] == 2 and ds["shape"][1:3] == ["batch_size", "sequence_length"]
    assert c["vision"]["image_size"] == 384 and c["vision"]["tokens_per_image"] == 144
    assert m["validation"]["passed"] and "variant" not in m
    checks = {(x["stage"], x["name"]) for x in m["validation"]["checks"]}
    assert ("vision", "deepstack_features image 1") in checks
    assert ("embedding", "deepstack_embeds batch 2, N>0") in checks
    assert verify_dir(qwen3_384.directory).ok


def test_drop_variant_matches_genai_contract_and_reports_its_deviation(qwen3_384_drop):
    d = qwen3_384_drop.directory
    assert d.name.endswith("-nodeepstack")
    m = read_manifest(d)
    c = m["components"]
    assert _names(c["vision"], "outputs") == ["image_features"]
    assert "deepstack_embeds" not in _names(c["decoder"], "inputs")
    v = m["variant"]
    assert v["deepstack"] == "dropped" and v["equivalent_to_source"] is False
    assert "does not compute what the source model computes" in v["statement"]
    worst = max(r["first_step_logits_max_abs"] for r in v["deviation_from_source"])
    assert worst > 1e-2  # DeepStack matters on this fixture: the deviation is real and measured
    assert m["validation"]["passed"]


def test_independent_script_reproduces_hf_generate_through_deepstack_graphs(qwen3_384, work_dirs):
    ckpt = fixture_dir(work_dirs["cache"], "qwen3_vl")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "independent_check.py"), str(qwen3_384.directory),
                          "--checkpoint", str(ckpt)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "32/32 tokens identical" in run.stdout


def test_qwen3_vl_refuses_392(capsys, tmp_path, work_dirs):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", f"out_dir={out}", f"cache_dir={work_dirs['cache']}",
                           "model=tiny_qwen3_vl", "vision.size=392")
    assert_clean_failure(code, err, out, "32", "384")


def test_qwen3_recipe_on_a_qwen2_5_checkpoint_is_refused(capsys, tmp_path, work_dirs, qwen25_392):
    out = tmp_path / "out"
    ckpt = fixture_dir(work_dirs["cache"], "qwen2_5_vl")
    code, _, err = run_cli(capsys, "export", f"out_dir={out}", f"cache_dir={work_dirs['cache']}",
                           "model=tiny_qwen3_vl", f"model.checkpoint={ckpt}")
    assert_clean_failure(code, err, out, "Qwen2.5-VL", "Qwen3-VL")


def test_deepstack_indexes_beyond_vision_depth_are_refused(capsys, tmp_path, work_dirs, qwen3_384):
    src = fixture_dir(work_dirs["cache"], "qwen3_vl")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_config"]["deepstack_visual_indexes"] = [0, 9]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", f"out_dir={out}", f"cache_dir={work_dirs['cache']}",
                           "model=tiny_qwen3_vl", f"model.checkpoint={ckpt}")
    assert_clean_failure(code, err, out, "deepstack", "9")


def test_drop_is_refused_for_a_family_without_deepstack(capsys, tmp_path, work_dirs):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", f"out_dir={out}", f"cache_dir={work_dirs['cache']}",
                           "model=tiny_qwen2_5_vl", "model.deepstack=drop")
    assert_clean_failure(code, err, out, "no DeepStack")
