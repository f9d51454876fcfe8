"""What bad input gets: a one-paragraph error naming what, where and the fix; non-zero exit; no
traceback; no artifact directory that `verify` would accept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmforge.cli import main
from tests.conftest import RECIPES


def run_cli(capsys, *argv):
    code = main(["--recipes", str(RECIPES), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def dirs(tmp_path, work_dirs):
    # The fixture cache is shared with the session so the tiny checkpoint is written once.
    return [f"out_dir={tmp_path / 'out'}", f"cache_dir={work_dirs['cache']}"], tmp_path / "out"


def assert_clean_failure(code, err, out_dir: Path, *needles):
    assert code == 2
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert "where:" in err and "fix:" in err
    leftovers = [p for p in out_dir.rglob("manifest.json")] if out_dir.exists() else []
    assert leftovers == []
    if out_dir.exists():
        assert not [p for p in out_dir.rglob("*.onnx")]


def test_unknown_recipe_option(capsys, dirs):
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, "model=no_such_model")
    assert_clean_failure(code, err, out, "RecipeError", "no_such_model")


def test_unknown_recipe_key_names_the_valid_ones(capsys, dirs):
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, "+model.chekpoint=/x")
    assert_clean_failure(code, err, out, "chekpoint", "checkpoint")


def test_missing_checkpoint_folder(capsys, dirs, tmp_path):
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, f"model.checkpoint={tmp_path / 'nope'}")
    assert_clean_failure(code, err, out, "CheckpointError", "does not exist")


def test_hub_id_offline_says_how_to_use_a_local_folder(capsys, dirs):
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, "model=qwen2_5_vl_3b")
    assert_clean_failure(code, err, out, "Qwen/Qwen2.5-VL-3B-Instruct", "model.checkpoint=")


def test_qwen2_5_vl_refuses_384_and_suggests_392(capsys, dirs):
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, "vision.size=384")
    assert_clean_failure(code, err, out, "28", "392")


def test_text_only_qwen2_checkpoint_is_refused(capsys, dirs, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ckpt = tmp_path / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(ckpt)
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, f"model.checkpoint={ckpt}")
    assert_clean_failure(code, err, out, "Qwen2ForCausalLM", "Qwen2.5-VL")


def _copy_fixture(work_dirs, tmp_path) -> Path:
    from vlmforge.source import resolve_checkpoint

    src = resolve_checkpoint("fixture:qwen2_5_vl", None, work_dirs["cache"], "test")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_refused(capsys, dirs, work_dirs, tmp_path):
    ckpt = _copy_fixture(work_dirs, tmp_path)
    w = next(ckpt.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-100])
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, f"model.checkpoint={ckpt}")
    assert_clean_failure(code, err, out, "truncated", w.name)


def test_corrupt_safetensors_header_is_refused(capsys, dirs, work_dirs, tmp_path):
    ckpt = _copy_fixture(work_dirs, tmp_path)
    w = next(ckpt.glob("*.safetensors"))
    data = bytearray(w.read_bytes())
    data[8:16] = b"garbage!"
    w.write_bytes(bytes(data))
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, f"model.checkpoint={ckpt}")
    assert_clean_failure(code, err, out, "not a valid safetensors")


def test_pickle_only_checkpoint_is_refused(capsys, dirs, work_dirs, tmp_path):
    ckpt = _copy_fixture(work_dirs, tmp_path)
    for w in ckpt.glob("*.safetensors"):
        w.rename(w.with_suffix(".bin"))
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, f"model.checkpoint={ckpt}")
    assert_clean_failure(code, err, out, "safetensors")


def test_verify_of_a_directory_without_manifest_fails(capsys, tmp_path):
    (tmp_path / "decoder.onnx").write_bytes(b"x")
    code, _, err = run_cli(capsys, "verify", str(tmp_path))
    assert code == 2 and "no manifest.json" in err and "Traceback" not in err


def test_verify_rejects_a_manifest_from_a_newer_schema(capsys, qwen25_392, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(qwen25_392.directory, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(capsys, "verify", str(copy))
    assert code == 2 and "newer" in err


def test_numeric_group_override_is_a_recipe_error(capsys, dirs):
    overrides, out = dirs
    code, _, err = run_cli(capsys, "export", *overrides, "vision=384")
    assert_clean_failure(code, err, out, "RecipeError")
