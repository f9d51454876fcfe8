"""The matrix on a real engine: a local Ray started (and stopped) by each run, a killed worker, and the checks
that refuse a bad launcher setting before any cell starts. Slurm runs for real in `make cluster-check`
(scripts/cluster_check.sh); here only its preflight, against whatever cluster this machine has (or none)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import RECIPES
from vlmforge.cli import main
from vlmforge.artifact.manifest import verify_dir

RAY_RUN_TIMEOUT_S = 240  # one run: Ray start ~7 s, a worker's imports ~10 s, a tiny cell ~10 s (on 2 busy cores)


def run_cli(capsys, *argv):
    code = main(["--recipes", str(RECIPES), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def export_all_argv(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "vlmforge.cli", "--recipes", str(RECIPES), "export-all", "--matrix", "smoke",
            *overrides]


def table_rows(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("cell "))
    return {line.split()[0]: line for line in lines[start + 2:] if line.strip()}


def wait_for_log_line(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"export-all ended (rc {proc.returncode}) before {log.name} said {text!r}")
        time.sleep(0.1)
    raise AssertionError(f"{log} did not say {text!r} within {timeout_s} s")


def verified(directory: Path) -> bool:
    """What `vlmforge verify` says: a folder without a manifest is an ArtifactError, not a report."""
    from vlmforge.core.errors import ArtifactError

    try:
        return verify_dir(directory).ok
    except ArtifactError:
        return False


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str, str]:
    """Wait for a run; on timeout kill its whole process group (the local Ray it started with it)."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"export-all on Ray ran past {timeout_s} s:\n{err[-3000:]}") from None
    return proc.returncode, out, err


# -- Ray for real ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_runs_the_smoke_matrix_and_a_killed_worker_fails_only_its_cell(qwen25_392, work_dirs, tmp_path):
    """Run 1: both cells as Ray tasks on a local Ray (2 CPUs, 200 MB object store, no dashboard, loopback);
    the FP16 cell's worker is SIGKILLed while it validates, with retries off. Run 2 (one retry allowed, the
    recipe's default) finishes only what is missing. chain_tokens=3 keeps the validation key this test's own,
    so the FP16 cell always has work left to kill; its FP32 exports come from the session's cache."""
    out = tmp_path / "out"
    ray_args = (f"out_dir={out}", f"cache_dir={work_dirs['cache']}", "validate.chain_tokens=3", "hydra/launcher=ray",
                "hydra.launcher.init.num_cpus=2", "hydra.launcher.init.object_store_memory=209715200",
                "hydra.launcher.init.include_dashboard=false", "hydra.launcher.cell.num_cpus=1",
                "hydra.launcher.heartbeat_s=5")
    logs = out / "logs"
    proc = subprocess.Popen(export_all_argv(*ray_args, "hydra.launcher.max_retries=0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_log_line(logs / "qwen2_5_vl_small_fp16.log", "validating", proc, RAY_RUN_TIMEOUT_S)
    started = json.loads((logs / "qwen2_5_vl_small_fp16.started.json").read_text())
    assert started["pid"] != proc.pid
    os.kill(started["pid"], signal.SIGKILL)  # the Ray worker process running the cell
    code, stdout, err = finish(proc, RAY_RUN_TIMEOUT_S)
    rows = table_rows(stdout)
    assert code == 1, err[-3000:]
    assert " ok " in rows["qwen2_5_vl_small"] and " FAILED " in rows["qwen2_5_vl_small_fp16"]
    assert "Ray worker died" in rows["qwen2_5_vl_small_fp16"]
    failed = json.loads((logs / "qwen2_5_vl_small_fp16.result.json").read_text())
    assert failed["status"] == "FAILED" and "WorkerCrashedError" in failed["error"], failed
    assert verify_dir(out / "tiny-qwen2_5_vl" / "fp32-392").ok
    fp16 = out / "tiny-qwen2_5_vl" / "fp16-392"
    assert not (fp16 / "manifest.json").exists() and not verified(fp16)  # nothing verify accepts
    for line in ("matrix on Ray: 2 queued, 0 running", "cell qwen2_5_vl_small: running (pid",
                 "cell qwen2_5_vl_small_fp16: running (pid", "cell qwen2_5_vl_small_fp16: FAILED: the Ray worker died",
                 "0 queued, 0 running, 1 done, 1 failed"):
        assert line in err, line  # progress while it waited
    assert "Started a local Ray instance" in err

    proc = subprocess.Popen(export_all_argv(*ray_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    code, stdout, err = finish(proc, RAY_RUN_TIMEOUT_S)
    rows = table_rows(stdout)
    assert code == 0, err[-3000:]
    assert "3/3 stages + validation" in rows["qwen2_5_vl_small"]  # done before: all from the cache
    assert "3/3 stages" in rows["qwen2_5_vl_small_fp16"]  # only its validation ran again
    for d in ("fp32-392", "fp16-392"):
        assert verify_dir(out / "tiny-qwen2_5_vl" / d).ok
    assert "0 queued, 0 running, 2 done, 0 failed" in err


@pytest.mark.slow
def test_ray_refuses_a_cell_no_node_can_hold_before_it_starts(work_dirs, tmp_path):
    """A task asking for more than any node has would wait forever; it is an error before submission."""
    out = tmp_path / "out"
    run = subprocess.run(export_all_argv(f"out_dir={out}", f"cache_dir={work_dirs['cache']}", "hydra/launcher=ray",
                                         "hydra.launcher.init.num_cpus=2", "hydra.launcher.cell.num_cpus=64"),
                         capture_output=True, text=True, timeout=RAY_RUN_TIMEOUT_S, start_new_session=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "needs 64 CPU" in run.stderr and "no Ray node has that much (largest: 2 CPU" in run.stderr
    assert "hydra.launcher.cell.num_cpus" in run.stderr
    assert not (out / "logs").exists()  # no cell started


# -- bad input, before any cell starts ----------------------------------------------------------------------------------
def test_a_ray_address_that_does_not_answer_is_an_error_in_seconds(capsys, tmp_path):
    t0 = time.monotonic()
    code, _, err = run_cli(capsys, "export-all", "--matrix", "smoke", f"out_dir={tmp_path / 'out'}",
                           f"cache_dir={tmp_path / 'cache'}", "hydra/launcher=ray", "hydra.launcher.init.address=127.0.0.1:9")
    assert code == 2 and "Traceback" not in err
    assert "the Ray head at 127.0.0.1:9 does not answer" in err and "fix:" in err and "address=null" in err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "out").exists()


def test_the_ray_launcher_without_ray_installed_says_what_to_install(tmp_path):
    """sys.modules['ray'] = None is Python's own way to make a module unimportable."""
    code = ("import sys; sys.modules['ray'] = None; from vlmforge.cli import main; "
            f"sys.exit(main(['--recipes', {str(RECIPES)!r}, 'export-all', 'out_dir={tmp_path / 'out'}', "
            "'hydra/launcher=ray']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "is not installed (no module 'ray')" in run.stderr and "-e '.[ray]'" in run.stderr


def _slurm_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_slurm_partition_that_does_not_exist_is_an_error_before_submission(capsys, tmp_path):
    """With a cluster (make cluster-check's, or a real one) the partition is looked up; without one the
    error says how to get one. Either way nothing is submitted."""
    code, _, err = run_cli(capsys, "export-all", "--matrix", "smoke", f"out_dir={tmp_path / 'out'}",
                           f"cache_dir={tmp_path / 'cache'}", "hydra/launcher=slurm",
                           "hydra.launcher.partition=no_such_partition")
    assert code == 2 and "Traceback" not in err
    if _slurm_answers():
        assert "Slurm partition 'no_such_partition' does not exist (sinfo lists [" in err
    else:
        assert "sinfo" in err and "scripts/slurm_local.sh up" in err
    assert "where: hydra.launcher.partition" in err and not (tmp_path / "out" / "logs").exists()


def test_a_cache_dir_that_cannot_hold_locks_is_refused_before_any_cell(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    code, _, err = run_cli(capsys, "export-all", "--matrix", "smoke", f"out_dir={tmp_path / 'out'}",
                           f"cache_dir={blocker / 'cache'}", "hydra/launcher=joblib")
    assert code == 2 and "Traceback" not in err
    assert "the stage cache cannot take file locks" in err and f"cache_dir={blocker / 'cache'}" in err
    assert "flock" in err and "NFSv4" in err and blocker.read_text() == "not a folder\n"
    assert not (tmp_path / "out").exists()


# -- the pieces ---------------------------------------------------------------------------------------------------------
def test_cache_lock_probe_passes_on_a_local_disk_and_leaves_nothing(tmp_path):
    from vlmforge.launch.preflight import check_cache_locks

    check_cache_locks(str(tmp_path / "cache"))
    assert list((tmp_path / "cache" / "stages").iterdir()) == []


def test_cell_memory_is_estimated_from_the_checkpoint_weights(qwen25_392, work_dirs):
    from safetensors import safe_open

    from vlmforge.launch.resources import BASE_BYTES, FACTOR_VALIDATE, GB, cell_resources, fp32_weight_bytes
    from vlmforge.source import fixture_dir

    folder = fixture_dir(work_dirs["cache"], "qwen2_5_vl")
    numel = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            numel += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    assert fp32_weight_bytes(folder) == 4 * numel
    cpu = cell_resources("fixture:qwen2_5_vl", str(work_dirs["cache"]), True, "cpu", {"num_cpus": 2})
    assert cpu.memory_bytes == BASE_BYTES + int(4 * numel * FACTOR_VALIDATE) and cpu.num_gpus == 0
    cuda = cell_resources("fixture:qwen2_5_vl", str(work_dirs["cache"]), True, "cuda", {"memory_gb": 20})
    assert cuda.memory_bytes == 20 * GB and cuda.num_gpus == 1 and cuda.num_cpus == 1
    hub = cell_resources("Qwen/Qwen2.5-VL-3B-Instruct", str(work_dirs["cache"]), True, "cpu", {"fallback_memory_gb": 24})
    assert hub.memory_bytes == 24 * GB


def test_a_result_the_cell_wrote_wins_over_the_launcher_failure_record(tmp_path):
    from vlmforge.launch.watch import mark_queued, mark_started, record_failure

    result = tmp_path / "logs" / "c.result.json"
    mark_started(result, "c")
    failed = record_failure(result, "c", "c.log", "the worker died")
    assert failed["status"] == "FAILED" and failed["pid"] == os.getpid() and "seconds" in failed
    assert record_failure(result, "c", "c.log", "again")["error"] == "the worker died"
    mark_queued(result)
    assert not result.exists() and not (tmp_path / "logs" / "c.started.json").exists()


def test_ray_init_arguments_start_a_local_ray_or_join_without_local_only_keys():
    from vlmforge.launch.ray_cells import init_kwargs

    local = {"address": None, "num_cpus": 2, "object_store_memory": 209715200, "include_dashboard": False,
             "log_to_driver": False}
    assert init_kwargs(local) == {**local, "address": "local"}  # never the cluster `ray start` left behind
    assert init_kwargs({**local, "address": "auto"}) == {"address": "auto", "log_to_driver": False}


def test_slurm_memory_is_the_recipes_or_the_largest_cells_estimate():
    from vlmforge.launch.preflight import slurm_mem_gb
    from vlmforge.launch.resources import GB, CellResources

    needs = [CellResources(1, int(1.5 * GB), 0), CellResources(1, int(20.2 * GB), 0)]
    assert slurm_mem_gb({"mem_gb": 64}, needs) == 64 and slurm_mem_gb({"mem_gb": None}, needs) == 21
