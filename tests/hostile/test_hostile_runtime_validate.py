"""Hostile artifact sets through `vlmforge generate`, `vlmforge chat` and `vlmforge validate`.

A set whose manifest was re-hashed around a swapped graph verifies; what it must not do is run. Every
session is checked against the manifest's contract and precision label on load."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tests.hostile._support import (Sentinel, assert_refused, cli, copy_set, list_outside, manifest, rehash,
                                    write_manifest)

IMAGE_ARGS = ("--prompt", "Describe it.", "--max-new-tokens", "2")


@pytest.fixture()
def sentinel(tmp_path) -> Sentinel:
    return Sentinel(tmp_path / "outside")


@pytest.fixture()
def art(qwen25_392, tmp_path) -> Path:
    return copy_set(qwen25_392.directory, tmp_path / "set")


def _identity_graph(path: Path) -> None:
    x = helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["b", "s", 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 64])
    g = helper.make_graph([helper.make_node("Identity", ["inputs_embeds"], ["logits"])], "identity", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))


def _swap(art: Path, how: str) -> None:
    dec = art / "decoder.onnx"
    if how == "embedding graph":
        shutil.copyfile(art / "embedding.onnx", dec)
    elif how == "identity graph":
        _identity_graph(dec)
    elif how == "garbage":
        dec.write_bytes(b"\x08\x07 not a protobuf " * 100)
    elif how == "fp16 under an fp32 label":
        from vlmforge.transforms.cast_fp16 import cast_fp16

        cast_fp16(art / "decoder.onnx", art / "decoder16.onnx", fp16_io=False)  # same I/O types, FP16 weights
        (art / "decoder16.onnx").replace(dec)
    rehash(art)


# -- generate ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how,needle", [
    ("embedding graph", "not the ones the manifest describes"),
    ("identity graph", "not the ones the manifest describes"),
    ("garbage", "onnxruntime cannot load decoder.onnx"),
    ("fp16 under an fp32 label", "labelled fp32"),
])
def test_generate_refuses_a_graph_that_is_not_the_one_described(capsys, art, how, needle):
    _swap(art, how)
    code, out, err = cli(capsys, "generate", str(art), *IMAGE_ARGS)
    assert_refused((code, out, err), "ArtifactError", needle)
    assert out == ""


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "BogusEP"])
def test_generate_refuses_a_provider_this_onnxruntime_lacks(capsys, art, provider):
    code, out, err = cli(capsys, "generate", str(art), *IMAGE_ARGS, "--provider", provider)
    assert_refused((code, out, err), "InputError", provider, "CPUExecutionProvider")
    assert out == ""  # no silent fallback, nothing of onnxruntime's own text on stdout


def test_generate_refuses_a_manifest_key_outside_the_set(capsys, art, sentinel):
    list_outside(art, "../outside/secret.txt", sentinel.secret)
    assert_refused(cli(capsys, "generate", str(art), *IMAGE_ARGS), "ArtifactError")
    sentinel.assert_untouched()


def test_generate_refuses_a_linked_file(capsys, art, sentinel):
    (art / "tokenizer_config.json").unlink()
    (art / "tokenizer_config.json").symlink_to(sentinel.secret)
    assert_refused(cli(capsys, "generate", str(art), *IMAGE_ARGS), "link or special file")
    sentinel.assert_untouched()


@pytest.mark.parametrize("content", ["[1, 2]", "{" * 100000, "\xff\xfe"])
def test_generate_refuses_a_runtime_config_that_is_not_an_object(capsys, art, content):
    (art / "genai_config.json").write_bytes(content.encode("latin-1"))
    rehash(art)
    assert_refused(cli(capsys, "generate", str(art), *IMAGE_ARGS), "genai_config.json")


def test_generate_refuses_a_contract_without_fixed_kv_dims(capsys, art):
    m = manifest(art)
    for t in m["components"]["decoder"]["inputs"]:
        if t["name"].startswith("past_key_values"):
            t["shape"][1] = "heads"
    write_manifest(art, m)
    assert_refused(cli(capsys, "generate", str(art), *IMAGE_ARGS), "ArtifactError")


def test_generate_with_an_unreadable_image(capsys, art, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_refused(cli(capsys, "generate", str(art), *IMAGE_ARGS, "--image", str(bad)), "InputError")


# -- chat ---------------------------------------------------------------------------------------------------------------
def test_chat_refuses_a_swapped_graph_before_reading_input(capsys, art, monkeypatch):
    _swap(art, "embedding graph")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert_refused(cli(capsys, "chat", str(art)), "not the ones the manifest describes")


def test_chat_refuses_a_bogus_provider(capsys, art, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert_refused(cli(capsys, "chat", str(art), "--provider", "BogusEP"), "BogusEP")


def test_chat_refuses_a_folder_without_manifest(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert_refused(cli(capsys, "chat", str(tmp_path)), "no manifest.json")


def test_chat_bad_image_keeps_the_session(capsys, art, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path / 'none.png'}\n/quit\n"))
    code, out, err = cli(capsys, "chat", str(art))
    assert code == 0 and "InputError" in err and "Traceback" not in err


# -- validate -----------------------------------------------------------------------------------------------------------
def test_validate_refuses_a_manifest_key_outside_the_set(capsys, art, sentinel):
    list_outside(art, str(sentinel.secret), sentinel.secret)
    assert_refused(cli(capsys, "validate", str(art)), "ArtifactError")
    sentinel.assert_untouched()


def test_validate_records_a_contract_failure_without_crashing(capsys, art):
    _swap(art, "embedding graph")
    code, out, err = cli(capsys, "validate", str(art))
    assert code == 1 and "Traceback" not in err, err
    assert "io matches contract" in out and "FAILED" in out


@pytest.fixture()
def local_set(capsys, work_dirs, tmp_path):
    """A set built from a checkpoint at a local path (validate=off: the checks run in the tests)."""
    from vlmforge.source import resolve_checkpoint

    ck = shutil.copytree(resolve_checkpoint("fixture:qwen2_5_vl", None, work_dirs["cache"], "test"), tmp_path / "ck")
    code, _, err = cli(capsys, "export", f"out_dir={tmp_path / 'o'}", f"cache_dir={work_dirs['cache']}",
                       f"model.checkpoint={ck}", "validate.chain_tokens=2", "validate.image_seeds=[1]")
    assert code == 0, err
    return tmp_path / "o" / "tiny-qwen2_5_vl" / "fp32-392", ck


def test_validate_after_the_checkpoint_moved_takes_checkpoint(capsys, local_set, tmp_path):
    directory, ck = local_set
    moved = ck.rename(tmp_path / "moved")
    assert_refused(cli(capsys, "validate", str(directory)), "CheckpointError", "--checkpoint")
    code, out, err = cli(capsys, "validate", str(directory), "--checkpoint", str(moved))
    assert code == 0 and "all passed" in out, err


def test_validate_says_the_checkpoint_config_changed(capsys, local_set):
    directory, ck = local_set
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 0.5
    (ck / "config.json").write_text(json.dumps(cfg))
    err = assert_refused(cli(capsys, "validate", str(directory)), "config.json differs", "artifacts themselves verify")
    assert "rebuild the artifact set with" not in err


def test_validate_with_another_familys_checkpoint(capsys, local_set, work_dirs):
    from vlmforge.source import resolve_checkpoint

    directory, _ = local_set
    other = resolve_checkpoint("fixture:qwen3_vl", None, work_dirs["cache"], "test")
    assert_refused(cli(capsys, "validate", str(directory), "--checkpoint", str(other)), "CheckpointError")


def test_precision_label_check_accepts_the_real_precisions(qwen25_392):
    from vlmforge.runtime.engine import precision_problems

    assert precision_problems(qwen25_392.directory / "decoder.onnx", "fp32") == []
    assert precision_problems(qwen25_392.directory / "decoder.onnx", "fp16") != []
