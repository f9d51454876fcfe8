"""`vlmforge export-all`: one Hydra multirun over the cells of a matrix recipe, on a choice of launcher."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import RECIPES
from vlmforge.cli import main
from vlmforge.recipe.matrix import plan_matrix
from vlmforge.artifact.manifest import verify_dir

# recipes/hydra/launcher/*.yaml must fit the launcher each one names: slurm.yaml is vlmforge's subclass of
# hydra-submitit-launcher 1.2.0's SlurmLauncher (its SlurmQueueConf fields + two of vlmforge's own); ray.yaml is
# vlmforge's Ray launcher (its constructor's parameters).
def _slurm_fields():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    return {"_target_", *(f.name for f in dataclasses.fields(SlurmQueueConf)), "poll_s", "heartbeat_s"}


def _ray_fields():
    from hydra_plugins.vlmforge_launchers.ray_launcher import VlmforgeRayLauncher

    return {"_target_", *inspect.signature(VlmforgeRayLauncher).parameters}


LAUNCHERS = {
    "slurm": ("hydra_plugins.vlmforge_launchers.slurm_launcher.VlmforgeSlurmLauncher", _slurm_fields),
    "ray": ("hydra_plugins.vlmforge_launchers.ray_launcher.VlmforgeRayLauncher", _ray_fields),
}


def run_cli(capsys, *argv):
    code = main(["--recipes", str(RECIPES), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_matrix_covers_families_precisions_and_trained_fixtures(tmp_path):
    plan = plan_matrix(RECIPES, "default", [f"out_dir={tmp_path}"])
    names = [c.name for c in plan.cells]
    assert names == ["qwen2_5_vl_small", "qwen2_5_vl_large", "qwen2_5_vl_small_fp16", "qwen2_5_vl_small_int4",
                     "qwen3_vl_small", "qwen3_vl_large", "qwen3_vl_small_fp16", "qwen3_vl_small_int4",
                     "qwen3_vl_small_nodeepstack", "trained_qwen2_5_vl_fp32", "trained_qwen2_5_vl_int4",
                     "trained_qwen3_vl_fp32", "trained_qwen3_vl_int4"]
    dirs = {c.name: os.path.relpath(c.directory, tmp_path) for c in plan.cells}
    assert dirs["qwen3_vl_small_nodeepstack"] == "tiny-qwen3_vl/fp32-384-nodeepstack"
    assert dirs["qwen2_5_vl_large"] == "tiny-qwen2_5_vl/fp32-672"
    assert dirs["qwen2_5_vl_small_int4"] == "tiny-qwen2_5_vl/int4-392"
    assert dirs["trained_qwen3_vl_int4"] == "trained-qwen3_vl/int4-128"
    assert len(set(dirs.values())) == len(names) and plan.in_process
    assert all(c.log == str(tmp_path / "logs" / f"{c.name}.log") for c in plan.cells)


def test_one_cell_and_extra_sweeps_come_from_the_command_line(tmp_path):
    one = plan_matrix(RECIPES, "default", [f"out_dir={tmp_path}", "+matrix/cell=qwen3_vl_small"])
    assert [c.name for c in one.cells] == ["qwen3_vl_small"]
    two = plan_matrix(RECIPES, "smoke", [f"out_dir={tmp_path}", "+matrix/cell=qwen2_5_vl_small", "precision=fp32,int4"])
    assert [c.name for c in two.cells] == ["qwen2_5_vl_small,precision=fp32", "qwen2_5_vl_small,precision=int4"]


def test_two_cells_writing_one_directory_stop_the_run_before_any_work(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export-all", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", "name=same")
    assert code == 2 and "Traceback" not in err
    assert "'qwen2_5_vl_small' and 'qwen2_5_vl_large'" in err and str(out / "tiny-qwen2_5_vl" / "same") in err
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_recipes_compose_and_fit_the_plugin_schema(launcher, tmp_path):
    from vlmforge.recipe.compose import compose_hydra

    target, fields = LAUNCHERS[launcher]
    raw = yaml.safe_load((RECIPES / "hydra" / "launcher" / f"{launcher}.yaml").read_text())
    assert raw["_target_"] == target and set(raw) <= fields()
    cfg = compose_hydra(RECIPES, ["+matrix=default", f"hydra/launcher={launcher}", f"out_dir={tmp_path}"])
    node = cfg.hydra.launcher
    assert node._target_ == target
    if launcher == "slurm":
        assert str(node.submitit_folder).startswith(str(tmp_path / "logs" / "multirun"))
        assert node.name == "vlmforge-export-all" and node.max_num_timeout >= 1
    else:
        assert node.init.address is None and node.cell.memory_gb is None and node.max_retries == 1


def test_a_launcher_that_is_not_installed_is_a_recipe_error(capsys, tmp_path):
    """hydra-ray-launcher is a real plugin that vlmforge does not install."""
    code, _, err = run_cli(capsys, "export-all", f"out_dir={tmp_path / 'out'}", "hydra/launcher=ray",
                           "hydra.launcher._target_=hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher")
    assert code == 2 and "Traceback" not in err and "pip install hydra-ray-launcher" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_failed_cell_does_not_stop_the_others(capsys, qwen25_392, work_dirs, tmp_path):
    """Basic (in-process) launcher; the FP16 cell fails its validation, the FP32 cell still builds."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "export-all", "--matrix", "smoke", f"out_dir={out}",
                                f"cache_dir={work_dirs['cache']}", "validate.chain_tokens=4",
                                "validate.tolerances.decoder.fp16.cosine=1.5")
    assert code == 1
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[2:]}
    assert rows["qwen2_5_vl_small"][1] == "ok" and rows["qwen2_5_vl_small_fp16"][1] == "FAILED"
    assert "3/3 stages" in stdout  # the FP32 cell's graphs came from the session's cache
    assert verify_dir(out / "tiny-qwen2_5_vl" / "fp32-392").ok
    assert (out / "tiny-qwen2_5_vl" / "fp16-392.failed").is_dir()
    assert "ValidationFailed" in (out / "logs" / "qwen2_5_vl_small_fp16.log").read_text()
    result = json.loads((out / "logs" / "qwen2_5_vl_small_fp16.result.json").read_text())
    assert result["status"] == "FAILED" and result["error"].startswith("ValidationFailed")


@pytest.mark.slow
def test_joblib_launcher_builds_two_cells_in_parallel(qwen25_392, work_dirs, tmp_path):
    """Two real jobs in two worker processes (joblib/loky): FP32 and FP16 of the tiny Qwen2.5-VL. Their FP32
    exports come from the session's cache (two processes building one key is test_cache's
    test_two_processes_asking_for_one_key_build_it_once); chain_tokens=5 is this test's own validation key,
    so both cells validate, at the same time, in their own processes."""
    from vlmforge.source import fixture_dir

    out, cache = tmp_path / "out", work_dirs["cache"]
    argv = [sys.executable, "-m", "vlmforge.cli", "--recipes", str(RECIPES), "export-all", "--matrix", "smoke",
            f"out_dir={out}", f"cache_dir={cache}", f"model.checkpoint={fixture_dir(work_dirs['cache'], 'qwen2_5_vl')}",
            "validate.chain_tokens=5", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in run.stderr
    table = run.stdout.splitlines()
    assert table[0].split()[:4] == ["cell", "status", "seconds", "peak"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == {"qwen2_5_vl_small", "qwen2_5_vl_small_fp16"}
    assert all(" ok " in r for r in rows.values())
    results = []
    for name in rows:
        assert "checks passed" in (out / "logs" / f"{name}.log").read_text()
        results.append(json.loads((out / "logs" / f"{name}.result.json").read_text()))
    assert all(r["status"] == "ok" and r["peak_rss_mb"] > 0 and verify_dir(r["directory"]).ok for r in results)
    a, b = results
    assert a["pid"] != b["pid"] and a["pid"] != os.getpid()  # two worker processes
    assert max(a["started"], b["started"]) < min(a["ended"], b["ended"])  # that ran at the same time
    assert sorted(r["directory"].rsplit("/", 1)[1] for r in results) == ["fp16-392", "fp32-392"]
    assert all("validating against PyTorch" in (out / "logs" / f"{n}.log").read_text() for n in rows)
