"""The stage cache: what goes into a key, integrity of entries, atomic and resumable builds."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import RECIPES, compose, seed_cache
from vlmforge.build import cache as C
from vlmforge.artifact.manifest import verify_dir
from vlmforge.progress import Progress
from vlmforge.source import resolve_checkpoint


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(name: str, data: bytes):
    def fill(tmp: Path) -> dict:
        (tmp / name).write_bytes(data)
        return {"note": "x"}
    return fill


# -- entries -----------------------------------------------------------------------------------------------------
def test_entry_is_reused_and_an_altered_entry_is_deleted_and_rebuilt(tmp_path, caplog):
    cache = C.StageCache(tmp_path)
    key = "ab" * 32
    entry, hit = cache.get_or_build("fam", "vision", key, {"k": 1}, _write("vision.onnx", b"graph"))
    assert not hit and entry.record == {"note": "x"}
    again, hit = cache.get_or_build("fam", "vision", key, {"k": 1}, _write("vision.onnx", b"other"))
    assert hit and (again.path / "vision.onnx").read_bytes() == b"graph"

    (entry.path / "vision.onnx").write_bytes(b"grapH")  # a user edits the cached file
    with caplog.at_level(logging.WARNING, logger="vlmforge.build.cache"):
        assert cache.lookup("fam", "vision", key) is None
    assert "corrupted" in caplog.text and not entry.path.exists()
    rebuilt, hit = cache.get_or_build("fam", "vision", key, {"k": 1}, _write("vision.onnx", b"graph"))
    assert not hit and (rebuilt.path / "vision.onnx").read_bytes() == b"graph"


@pytest.mark.parametrize("damage", ["extra file", "edited record", "missing file"])
def test_every_kind_of_damage_is_detected(tmp_path, damage):
    cache = C.StageCache(tmp_path)
    key = "cd" * 32
    entry, _ = cache.get_or_build("fam", "decoder", key, {}, _write("decoder.onnx", b"g"))
    if damage == "extra file":
        (entry.path / "decoder.onnx.data").write_bytes(b"d")
    elif damage == "edited record":
        text = (entry.path / C.ENTRY).read_text().replace('"note": "x"', '"note": "y"')
        (entry.path / C.ENTRY).write_text(text)
    else:
        (entry.path / "decoder.onnx").unlink()
    assert cache.lookup("fam", "decoder", key) is None and not entry.path.exists()


def test_a_copy_into_the_set_is_hashed_as_written_checked_against_its_entry_and_stoppable(tmp_path, monkeypatch):
    """materialize copies chunk by chunk and returns each copy's sha256 and stamp, which the manifest uses for
    files not rewritten since (hash_files re-reads one whose stamp changed); a cache file changed after its
    entry was verified makes the copy an error, not a set with the wrong bytes; a set stop event ends the copy
    between chunks (a failing build's background copy)."""
    import hashlib

    from vlmforge.artifact.manifest import hash_files
    from vlmforge.core.errors import ArtifactError

    monkeypatch.setattr(C, "COPY_CHUNK", 7)  # several chunks per file
    data = bytes(range(200)) * 3
    entry, _ = C.StageCache(tmp_path / "cache").get_or_build("fam", "decoder", "ef" * 32, {},
                                                              _write("decoder.onnx", data))
    staged = entry.materialize(tmp_path / "set")
    want = hashlib.sha256(data).hexdigest()
    assert (tmp_path / "set" / "decoder.onnx").read_bytes() == data and staged["decoder.onnx"]["sha256"] == want
    assert hash_files(tmp_path / "set", staged) == {"decoder.onnx": {"sha256": want, "bytes": len(data)}}
    # a forged known hash is used only while the file's stamp is the one recorded when it was hashed
    forged = {"decoder.onnx": {**staged["decoder.onnx"], "sha256": "0" * 64}}
    assert hash_files(tmp_path / "set", forged)["decoder.onnx"]["sha256"] == "0" * 64
    (tmp_path / "set" / "decoder.onnx").write_bytes(data[::-1])
    assert hash_files(tmp_path / "set", forged)["decoder.onnx"]["sha256"] == hashlib.sha256(data[::-1]).hexdigest()

    (entry.path / "decoder.onnx").write_bytes(data[:-1] + b"X")  # changed after the entry was verified
    with pytest.raises(ArtifactError, match="differs from its cache entry") as err:
        entry.materialize(tmp_path / "set2")
    assert err.value.where == str(entry.path / "decoder.onnx") and "FORCE=1" in err.value.fix
    stop = threading.Event()
    stop.set()
    with pytest.raises(C.CopyStopped):
        entry.materialize(tmp_path / "set3", stop=stop)


def test_a_failed_fill_leaves_no_entry_and_no_temp_folder(tmp_path):
    cache = C.StageCache(tmp_path)

    def boom(tmp: Path) -> dict:
        (tmp / "half.onnx").write_bytes(b"half")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError):
        cache.get_or_build("fam", "vision", "ef" * 32, {}, boom)
    assert [p.name for p in cache.slot("fam", "vision").iterdir() if not p.name.endswith(".lock")] == []


def test_a_temp_folder_of_a_dead_writer_is_never_used_and_is_removed(tmp_path):
    cache = C.StageCache(tmp_path)
    key = "12" * 32
    slot = cache.slot("fam", "vision")
    slot.mkdir(parents=True)
    dead = slot / f".tmp-{key[:12]}-{C._host()}-{_dead_pid()}"
    dead.mkdir()
    (dead / "vision.onnx").write_bytes(b"partial")
    assert cache.lookup("fam", "vision", key) is None  # only <key>/ is ever read
    entry, hit = cache.get_or_build("fam", "vision", key, {}, _write("vision.onnx", b"whole"))
    assert not hit and not dead.exists() and (entry.path / "vision.onnx").read_bytes() == b"whole"


def test_a_dead_writers_temp_folder_is_removed_on_a_cache_hit_too(tmp_path):
    cache = C.StageCache(tmp_path)
    key = "13" * 32
    cache.get_or_build("fam", "vision", key, {}, _write("vision.onnx", b"whole"))
    dead = cache.slot("fam", "vision") / f".tmp-{key[:12]}-{C._host()}-{_dead_pid()}"
    dead.mkdir()
    (dead / "vision.onnx").write_bytes(b"partial, left by a killed build")
    entry, hit = cache.get_or_build("fam", "vision", key, {}, _write("vision.onnx", b"never called"))
    assert hit and not dead.exists() and (entry.path / "vision.onnx").read_bytes() == b"whole"


_RACER = """
import sys, time
from pathlib import Path
from vlmforge.build.cache import StageCache

def fill(tmp):
    with open(sys.argv[2], "a") as log:
        log.write("fill\\n")
    time.sleep(1.0)  # long enough that the other process asks for the key while this one builds it
    (tmp / "vision.onnx").write_bytes(b"built once")
    return {}

entry, hit = StageCache(Path(sys.argv[1])).get_or_build("fam", "vision", "34" * 32, {}, fill)
print("hit" if hit else "built", entry.path.joinpath("vision.onnx").read_bytes().decode())
"""


def test_two_processes_asking_for_one_key_build_it_once(tmp_path):
    """The per-key flock that parallel matrix cells rely on: one process builds, the other waits and hits."""
    log = tmp_path / "fills.log"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(log)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == ["built built once", "hit built once"] and log.read_text() == "fill\n"


def test_force_rebuilds_an_existing_entry(tmp_path):
    key = "34" * 32
    C.StageCache(tmp_path).get_or_build("fam", "vision", key, {}, _write("vision.onnx", b"old"))
    entry, hit = C.StageCache(tmp_path, force=True).get_or_build("fam", "vision", key, {}, _write("vision.onnx", b"new"))
    assert not hit and (entry.path / "vision.onnx").read_bytes() == b"new"


def test_stale_work_folders_are_told_from_live_and_foreign_ones(tmp_path):
    from vlmforge.build import WORK_DIR

    host, dead = C._host(), _dead_pid()
    names = {
        f".fp32-392.staging-{host}-{dead}": True,  # dead here: removed
        f".fp32-392.fp32-{host}-{dead}": True,
        f".fp32-392.staging-{dead}": True,  # older naming, bare pid
        f".fp32-392.staging-{host}-{os.getpid()}": False,  # alive
        f".fp32-392.staging-otherhost-{dead}": False,  # another node of a shared filesystem: not ours to judge
        "fp32-392": False,
    }
    for n in names:
        (tmp_path / n).mkdir()
    C.remove_stale(tmp_path, WORK_DIR)
    assert {n for n in names if (tmp_path / n).exists()} == {n for n, gone in names.items() if not gone}


# -- keys --------------------------------------------------------------------------------------------------------
def _keys(work_dirs, *overrides):
    from vlmforge.build import cache_keys

    return cache_keys(compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", *overrides))


def test_block_size_changes_only_the_decoder_transform_key(work_dirs):
    a = _keys(work_dirs, "model=tiny_qwen2_5_vl", "precision=int4", "precision.int4.block_size=32")
    b = _keys(work_dirs, "model=tiny_qwen2_5_vl", "precision=int4", "precision.int4.block_size=64")
    assert a["export"] == b["export"] and "decoder" not in a["export"]  # exported straight to INT4: no FP32 entry
    assert a["final"]["vision"] == b["final"]["vision"] and a["final"]["embedding"] == b["final"]["embedding"]
    assert a["final"]["decoder"] != b["final"]["decoder"]
    assert a["validation"] != b["validation"]
    fp32 = _keys(work_dirs, "model=tiny_qwen2_5_vl", "precision=fp32")
    assert {s: fp32["export"][s] for s in a["export"]} == a["export"]
    assert fp32["final"]["decoder"] not in a["final"].values()


def test_keys_ignore_what_cannot_change_a_graph(work_dirs):
    base = _keys(work_dirs, "model=tiny_qwen2_5_vl")
    other = _keys(work_dirs, "model=tiny_qwen2_5_vl", "validate.chain_tokens=4", "name=elsewhere")
    assert other["final"] == base["final"] and other["validation"] != base["validation"]
    large = _keys(work_dirs, "model=tiny_qwen2_5_vl", "vision=large")
    assert large["final"]["vision"] != base["final"]["vision"]
    assert {s: large["final"][s] for s in ("embedding", "decoder")} == {s: base["final"][s] for s in ("embedding", "decoder")}


# -- builds ------------------------------------------------------------------------------------------------------
def test_second_build_is_up_to_date_without_loading_the_model(qwen25_392, work_dirs, monkeypatch, caplog):
    import vlmforge.build as B
    import vlmforge.build.plan as P

    def no_model(*a, **k):
        raise AssertionError("the PyTorch model was loaded for a fully cached build")

    monkeypatch.setattr(P, "reference_model", no_model)
    cfg = compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", "model=tiny_qwen2_5_vl",
                  "vision=small", "name=cached-again")
    with caplog.at_level(logging.INFO, logger="vlmforge.build"):
        report = B.run_build(cfg)
    assert report.cache == {"vision": "cached", "embedding": "cached", "decoder": "cached", "validation": "cached"}
    assert report.cache_summary() == "3/3 stages + validation" and not report.model_loaded
    for stage in ("vision", "embedding", "decoder"):
        assert f"{stage}: up to date (cache " in caplog.text
    assert verify_dir(report.directory).ok
    assert [c.to_json() for c in report.checks] == [c.to_json() for c in qwen25_392.checks]


@pytest.mark.slow
def test_killed_build_leaves_nothing_verifiable_and_the_next_run_resumes(qwen25_392, work_dirs, tmp_path):
    """SIGKILL while the decoder is exported; the re-run reuses vision and embedding and publishes. The test's
    own cache starts with the session's vision and embedding entries, so only the decoder is exported here."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    seed_cache(work_dirs["cache"], cache, "qwen2_5_vl", ("vision", "embedding"))
    ckpt = resolve_checkpoint("fixture:qwen2_5_vl", None, work_dirs["cache"], "test")  # the session's fixture
    argv = [sys.executable, "-m", "vlmforge.cli", "--recipes", str(RECIPES), "export", f"out_dir={out}",
            f"cache_dir={cache}", f"model.checkpoint={ckpt}", "validate.chain_tokens=4"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen = []
    deadline = time.time() + 240
    for line in proc.stderr:
        seen.append(line)
        if "decoder: exporting" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any("decoder: exporting" in s for s in seen), "".join(seen)[-2000:]
    assert list(out.rglob("manifest.json")) == []  # nothing `vlmforge verify` would accept
    assert [p.name for p in (out / "tiny-qwen2_5_vl").iterdir() if ".staging-" in p.name]  # the dead build's work

    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vision: up to date (cache " in run.stderr and "embedding: up to date (cache " in run.stderr
    assert "decoder: exported in" in run.stderr and "left by an interrupted build" in run.stderr
    peaks = [float(m) for m in re.findall(r"\(RSS [\d.]+ GiB, peak ([\d.]+) GiB\)", run.stderr)]
    assert len(peaks) >= 3 and peaks == sorted(peaks) and 0 < peaks[0]  # each node's line: memory now and peak
    final = out / "tiny-qwen2_5_vl" / "fp32-392"
    assert verify_dir(final).ok
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".")] == []
    assert not [p for p in (cache / "stages").rglob(".tmp-*")]


# -- progress ----------------------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_one_status_line_on_a_terminal_only():
    tty = _Tty()
    with Progress(stream=tty, interval=0.01).step("decoder: exporting"):
        time.sleep(0.05)
    text = tty.getvalue()
    assert "decoder: exporting" in text and " s" in text and text.endswith("\r\033[K")
    quiet = io.StringIO()
    with Progress(stream=quiet).step("decoder: exporting"):
        time.sleep(0.02)
    assert quiet.getvalue() == ""


def test_a_note_names_where_a_long_step_is_on_the_line_or_in_the_log(monkeypatch, caplog):
    from vlmforge import progress

    tty = _Tty()
    p = Progress(stream=tty, interval=0.01)
    with p.step("decoder: exporting"):
        progress.note("writing weights: layer 3/36")
        time.sleep(0.05)
        with p.step("inner"):  # a step inside a step: the same line names it, then the outer
            time.sleep(0.05)
            assert [t.name for t in threading.enumerate()].count("vlmforge-progress") == 1
        time.sleep(0.05)
    assert "decoder: exporting (writing weights: layer 3/36)" in tty.getvalue()
    assert "inner" in tty.getvalue() and "decoder: exporting" in tty.getvalue().rpartition("inner")[2]
    progress.note("outside any step")  # nothing runs: nothing happens
    caplog.set_level("INFO", logger="vlmforge.progress")
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    with Progress(stream=io.StringIO()).step("validating against PyTorch"):
        progress.note("reading language_model.layers 1/2")
        progress.note("reading language_model.layers 2/2")
    lines = [r.getMessage() for r in caplog.records if r.name == "vlmforge.progress"]
    assert [m.rsplit(" (", 1)[0] for m in lines] == ["validating against PyTorch: reading language_model.layers 1/2",
                                                       "validating against PyTorch: reading language_model.layers 2/2"]
    caplog.clear()
    monkeypatch.setattr(progress, "LOG_EVERY", 3600.0)  # a short step logs none of its notes
    with Progress(stream=io.StringIO()).step("validating against PyTorch"):
        progress.note("reading language_model.layers 1/2")
    assert not [r for r in caplog.records if r.name == "vlmforge.progress"]
