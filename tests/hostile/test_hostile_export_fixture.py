"""Hostile recipes and checkpoints through `vlmforge export`, and hostile targets for `vlmforge fixture`.

The build only ever replaces or deletes what it can prove it made; every name resolves inside out_dir;
a checkpoint's files are confined before their bytes are copied into a set; a config that would make
transformers instantiate a full-size model is refused before any model exists."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.hostile._support import (SECRET, Sentinel, assert_refused, cli, manifests_under, no_bytes_of, small_fs,
                                    snapshot)


@pytest.fixture()
def sentinel(tmp_path) -> Sentinel:
    return Sentinel(tmp_path / "outside")


@pytest.fixture()
def out(tmp_path, qwen25_392) -> Path:
    """An out_dir that already holds a finished set, its log, and a user's file beside them."""
    root = tmp_path / "out"
    model = root / qwen25_392.directory.parent.name
    shutil.copytree(qwen25_392.directory, model / "fp32-392")
    (model / "logs").mkdir()
    (model / "logs" / "fp32-392.json").write_text("{}\n")
    (root / "README.user").write_text("mine\n")
    return root


@pytest.fixture(scope="module")
def fixture_ckpt(work_dirs):
    from vlmforge.source import resolve_checkpoint

    return resolve_checkpoint("fixture:qwen2_5_vl", None, work_dirs["cache"], "test")


def export(capsys, work_dirs, out_dir: Path, *overrides: str):
    return cli(capsys, "export", f"out_dir={out_dir}", f"cache_dir={work_dirs['cache']}", "validate.chain_tokens=2",
               *overrides)


def ckpt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- names never leave out_dir, and never replace what the build did not make ----------------------------------------
@pytest.mark.parametrize("name", [".", "..", "../escape", "a/b", "/ABS", ".hidden", "logs", "x.failed", "~"])
def test_export_refuses_names_outside_out_dir(capsys, work_dirs, out, sentinel, qwen25_392, name):
    name = str(sentinel.root / "victim") if name == "/ABS" else name
    before = snapshot(out)
    assert_refused(export(capsys, work_dirs, out, "validate=off", f"name={name}"), "RecipeError", "name")
    assert snapshot(out) == before
    sentinel.assert_untouched()


@pytest.mark.parametrize("model_name", ["..", "../x", "/tmp/x"])
def test_export_refuses_model_names_outside_out_dir(capsys, work_dirs, out, model_name):
    before = snapshot(out)
    assert_refused(export(capsys, work_dirs, out, "validate=off", f"model.name={model_name}"), "model.name")
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", ["user folder", "file", "link"])
def test_export_never_replaces_what_it_did_not_make(capsys, work_dirs, out, sentinel, kind):
    target = out / "tiny-qwen2_5_vl" / "mine"
    if kind == "user folder":
        target.mkdir()
        (target / "data.csv").write_text("1,2,3\n")
    elif kind == "file":
        target.write_text("a file\n")
    else:
        target.symlink_to(sentinel.root, target_is_directory=True)
    before = snapshot(out)
    assert_refused(export(capsys, work_dirs, out, "validate=off", "name=mine"), "vlmforge will not replace it"
                   if kind == "user folder" else "not an artifact folder")
    assert snapshot(out) == before
    sentinel.assert_untouched()


def test_export_refuses_an_out_dir_that_is_a_file(capsys, work_dirs, tmp_path):
    f = tmp_path / "out-file"
    f.write_text("not a folder\n")
    assert_refused(export(capsys, work_dirs, f, "validate=off"), "FileSystemError", str(f))
    assert f.read_text() == "not a folder\n"


def test_export_to_a_read_only_file_system(capsys, work_dirs, tmp_path):
    with small_fs(tmp_path / "ro", readonly=True) as fs:
        assert_refused(export(capsys, work_dirs, fs / "out", "validate=off"), "Read-only file system")


def test_export_on_a_full_disk_says_where_and_how_much(capsys, work_dirs, tmp_path, qwen25_392):
    with small_fs(tmp_path / "tiny", "512k") as fs:
        assert_refused(export(capsys, work_dirs, fs, "validate=off"), "no space left", "is needed")
        assert manifests_under(fs) == [] and not any(p.name.startswith(".") for p in fs.rglob("*"))


def test_export_with_a_full_cache_disk_during_onnx_save(capsys, tmp_path, fixture_ckpt):
    with small_fs(tmp_path / "tiny", "600k") as fs:
        err = assert_refused(cli(capsys, "export", f"out_dir={tmp_path / 'o'}", f"cache_dir={fs}", "validate=off",
                                 f"model.checkpoint={fixture_ckpt}"), "FileSystemError", "no space left", "is needed")
        assert "vlmforge bug" not in err
        assert not [p for p in fs.rglob("*.onnx")]  # the half-written graph went with its temp folder
    assert manifests_under(tmp_path / "o") == []


# -- checkpoints ------------------------------------------------------------------------------------------------------
def test_export_never_copies_a_linked_tokenizer_file_from_outside(capsys, work_dirs, tmp_path, fixture_ckpt, sentinel):
    ck = ckpt_copy(fixture_ckpt, tmp_path / "ck")
    (ck / "tokenizer_config.json").unlink()
    (ck / "tokenizer_config.json").symlink_to(sentinel.secret)
    o = tmp_path / "o"
    assert_refused(export(capsys, work_dirs, o, "validate=off", f"model.checkpoint={ck}"), "CheckpointError",
                   str(sentinel.secret))
    assert manifests_under(o) == [] and (not o.exists() or no_bytes_of(o, SECRET))
    sentinel.assert_untouched()


def test_export_follows_hf_cache_snapshot_links_into_blobs(capsys, work_dirs, tmp_path, fixture_ckpt):
    """A hub cache keeps files in blobs/ and links them from snapshots/<rev>/: normal, and must work."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in fixture_ckpt.iterdir():
        blob = repo / "blobs" / f"blob-{p.name}"
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(Path("..", "..", "blobs", blob.name))
    code, outp, err = export(capsys, work_dirs, tmp_path / "o", "validate=off", f"model.checkpoint={snap}")
    assert code == 0, err
    from vlmforge.artifact.manifest import verify_dir

    assert verify_dir(tmp_path / "o" / "tiny-qwen2_5_vl" / "fp32-392").files_ok  # validate=off: no checks


def _edit_config(ck: Path, edit) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("drop", ["text_config", "vision_config", "image_token_id"])
def test_export_refuses_a_config_that_would_instantiate_a_default_model(capsys, work_dirs, tmp_path, fixture_ckpt,
                                                                       drop):
    ck = ckpt_copy(fixture_ckpt, tmp_path / "ck")
    _edit_config(ck, lambda c: c.pop(drop))
    t = time.perf_counter()
    assert_refused(export(capsys, work_dirs, tmp_path / "o", "validate=off", f"model.checkpoint={ck}"), drop,
                   "CheckpointError")
    assert time.perf_counter() - t < 60  # refused from the config, not after building a 7B model


def test_export_refuses_a_config_larger_than_its_weights(capsys, work_dirs, tmp_path, fixture_ckpt):
    ck = ckpt_copy(fixture_ckpt, tmp_path / "ck")
    _edit_config(ck, lambda c: c["text_config"].update(intermediate_size=20000, num_hidden_layers=40,
                                                       layer_types=["full_attention"] * 40))
    assert_refused(export(capsys, work_dirs, tmp_path / "o", "validate=off", f"model.checkpoint={ck}"),
                   "parameters", "safetensors files hold")


def test_export_refuses_an_inconsistent_config(capsys, work_dirs, tmp_path, fixture_ckpt):
    ck = ckpt_copy(fixture_ckpt, tmp_path / "ck")
    _edit_config(ck, lambda c: c["text_config"].update(num_hidden_layers=40))  # layer_types says 3
    assert_refused(export(capsys, work_dirs, tmp_path / "o", "validate=off", f"model.checkpoint={ck}"),
                   "CheckpointError", "config.json")


@pytest.mark.parametrize("how", ["huge shape", "offsets past the end", "overlap", "bad dtype", "header length"])
def test_export_refuses_a_hostile_safetensors_header(capsys, work_dirs, tmp_path, fixture_ckpt, how):
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copyfile(fixture_ckpt / "config.json", ck / "config.json")
    tensors = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if how == "huge shape":
        tensors["a"]["shape"] = [1 << 40, 1 << 20]
    elif how == "offsets past the end":
        tensors["a"]["data_offsets"] = [0, 1 << 40]
    elif how == "overlap":
        tensors["b"] = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
    elif how == "bad dtype":
        tensors["a"]["dtype"] = "Q7"
    header = json.dumps(tensors).encode()
    length = (1 << 62) if how == "header length" else len(header)
    (ck / "model.safetensors").write_bytes(struct.pack("<Q", length) + header + bytes(16))
    assert_refused(export(capsys, work_dirs, tmp_path / "o", "validate=off", f"model.checkpoint={ck}"),
                   "model.safetensors is not a valid safetensors file")


# -- recipe values ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,needles", [
    ("validate.decode_steps=-1", ("validate.decode_steps", ">= 1")),
    ("validate.chain_tokens=abc", ("validate.chain_tokens", "Integer")),
    ("validate.tolerances.decoder.fp32.max_rel=abc", ("max_rel='abc' is not a number",)),
    ("validate.tolerances.decoder.fp32.maxrel=1", ("maxrel", "max_rel")),
    ("+validate.tolerances.decodr.fp32.max_rel=1", ("decodr", "decoder")),
    ("+validate.tolerances.decoder.fp33.max_rel=1", ("fp33", "fp32")),
    ("+validate.tolerances.decoder.fp32.cosin=0.9", ("cosin", "cosine")),
    ("+bogus=1", ("bogus", "valid keys")),
    ("+validate.bogus=1", ("bogus", "chain_tokens")),
    ("model.load_dtype=int8", ("model.load_dtype", "float32")),
    ("validate.images=[/no/such.png]", ("validate.images[0]",)),
])
def test_export_refuses_bad_recipe_values_naming_the_key(capsys, work_dirs, tmp_path, override, needles):
    err = assert_refused(export(capsys, work_dirs, tmp_path / "o", override), "RecipeError", *needles)
    if "load_dtype" in override:
        assert "checkpoint" not in err.split("fix:")[1]  # the recipe's mistake, not the checkpoint's
    assert not (tmp_path / "o").exists()


def test_export_interrupted_by_sigint_exits_130_and_leaves_nothing_complete(work_dirs, tmp_path):
    o = tmp_path / "o"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmforge.cli", "--recipes", str(REPO / "recipes"), "export",
                             f"out_dir={o}", f"cache_dir={tmp_path / 'cache'}", "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not list(o.glob("*/.*staging*")):
        time.sleep(0.2)
    time.sleep(1.0)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    for _ in range(5):  # Python drops a KeyboardInterrupt raised inside a __del__ during GC: press again, as a user would
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        while time.time() - t0 < 5 and proc.poll() is None and not any("interrupted" in ln for ln in lines):
            time.sleep(0.1)
        if proc.poll() is not None or any("interrupted" in ln for ln in lines):
            break  # heard: it is cleaning up (that can take seconds on a busy machine); do not press again
    if any("interrupted" in ln for ln in lines):  # an impatient user keeps pressing while the interpreter tears down
        for _ in range(100):
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert manifests_under(o) == []


# -- fixture ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "non-empty folder", "link"])
def test_fixture_never_replaces_an_existing_path(capsys, tmp_path, sentinel, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("precious\n")
    elif kind == "non-empty folder":
        target.mkdir()
        (target / "precious.txt").write_text("precious\n")
    else:
        target.symlink_to(sentinel.root, target_is_directory=True)
    before = snapshot(tmp_path)
    assert_refused(cli(capsys, "fixture", "qwen2_5_vl", str(target)), "CheckpointError", "writes only new or empty")
    assert snapshot(tmp_path) == before


def test_fixture_refuses_an_unknown_family(capsys, tmp_path):
    assert_refused(cli(capsys, "fixture", "llama", str(tmp_path / "x")), "llama")
    assert not (tmp_path / "x").exists()


def test_fixture_on_a_full_disk_says_where_and_how_much(capsys, tmp_path):
    with small_fs(tmp_path / "tiny", "256k") as fs:
        assert_refused(cli(capsys, "fixture", "qwen2_5_vl", str(fs / "ck")), "no space left", "is needed")
        assert list(fs.iterdir()) == []


def _default_sigint() -> None:
    """The child starts with SIGINT at its default and unblocked, as a terminal gives it: a process inherits an
    ignored or blocked SIGINT (a pytest-xdist worker can hold one after earlier tests), and then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
