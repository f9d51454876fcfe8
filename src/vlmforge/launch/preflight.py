"""Checks made before any cell starts, so that a wrong launcher setting is one clear error (what, where,
fix; exit 2) instead of N failed cells or a submission that waits forever.

* the launcher's plugin and engine are installed;
* every cache directory the cells share takes exclusive file locks (the stage cache's flock);
* Ray: the address answers (bounded), and every cell fits some node;
* Slurm: the client commands reach a controller, the partition exists, and a cell's request fits its nodes.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import importlib.util
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from vlmforge.core.errors import RecipeError
from vlmforge.launch.resources import GB, cell_resources

log = logging.getLogger("vlmforge.launch")

# launcher module prefix -> (modules it needs, what to install)
PLUGINS = {
    "hydra_plugins.vlmforge_launchers.ray_launcher": (("ray",), "pip install -c constraints.txt -e '.[ray]'"),
    "hydra_plugins.vlmforge_launchers.slurm_launcher": (
        ("submitit", "hydra_plugins.hydra_submitit_launcher"), "pip install -c constraints.txt -e '.[slurm]'"),
    "hydra_plugins.hydra_submitit_launcher": (("submitit",), "pip install -c constraints.txt -e '.[slurm]'"),
    "hydra_plugins.hydra_joblib_launcher": ((), "pip install -c constraints.txt -e '.[launchers]'"),
    "hydra_plugins.hydra_ray_launcher": (("ray",), "pip install hydra-ray-launcher (or use hydra/launcher=ray)"),
}
LOCK_TIMEOUT_S = 20


def check_installed(target: str, where: Path) -> None:
    module = target.rpartition(".")[0]
    needs, fix = next(((m, f) for k, (m, f) in PLUGINS.items() if module.startswith(k)), ((), f"pip install {module}"))
    for name in (*needs, module):
        try:  # find_spec for the engines: importing ray here would fix its node address before connect() chose it
            found = importlib.util.find_spec(name) is not None if name in needs else importlib.import_module(name)
        except ImportError:
            found = False
        if not found:
            raise RecipeError(f"the launcher {target} is not installed (no module {name!r})",
                              where=f"hydra/launcher of {where}",
                              fix=f".venv/bin/{fix} (or use hydra/launcher=basic or joblib)")


# -- the shared stage cache ------------------------------------------------------------------------------------------
_CHILD = """
import fcntl, sys
with open(sys.argv[1], "a") as fh:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
sys.exit(0)
"""


def _other_process_can_lock(path: Path) -> bool:
    run = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                         timeout=LOCK_TIMEOUT_S)
    if run.returncode not in (0, 3):
        raise OSError(errno.ENOLCK, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "probe failed")
    return run.returncode == 0


def check_cache_locks(cache_dir: str) -> None:
    """The stage cache builds a stage once across workers by flock on <cache_dir>/stages/...: probe that an
    flock taken here excludes another process (and is free again once released). The probe file is created
    and removed here; the folders it needs are the cache's own."""
    where = f"cache_dir={cache_dir}"
    fix = ("put cache_dir (and out_dir) on a filesystem with working flock that every worker mounts: a local "
           "disk for one node; NFSv4, or NFSv3 with lockd (not mounted -o nolock); Lustre mounted -o flock (not "
           "localflock); GPFS; CephFS")
    probe = Path(cache_dir) / "stages" / f".lock-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            excluded = not _other_process_can_lock(probe)
            fcntl.flock(fh, fcntl.LOCK_UN)
        released = _other_process_can_lock(probe) if excluded else False
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RecipeError(f"the stage cache cannot take file locks in {probe.parent} ({exc})", where=where,
                          fix=fix) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    if not (excluded and released):
        raise RecipeError(f"file locks in {probe.parent} do not exclude another process (flock is a no-op here): "
                          "two workers would build the same stage at once", where=where, fix=fix)


# -- engines ---------------------------------------------------------------------------------------------------------
def launcher_kind(target: str) -> str:
    return {"VlmforgeRayLauncher": "ray", "VlmforgeSlurmLauncher": "slurm"}.get(target.rpartition(".")[2], "")


def check_ray(launcher: dict, cells, where: str) -> None:
    from vlmforge.launch import ray_cells

    ray_cells.connect(launcher.get("init") or {}, where=f"hydra.launcher.init of {where}")
    needs = {c.name: cell_resources(c.checkpoint, c.cache_dir, c.validate, c.target, launcher.get("cell") or {})
             for c in cells}
    ray_cells.check_fits(needs, where=f"hydra.launcher.cell of {where}")


def slurm_mem_gb(launcher: dict, needs) -> int:
    """The array's --mem: the recipe's mem_gb, or (null) the largest cell's estimate, rounded up."""
    if launcher.get("mem_gb"):
        return int(launcher["mem_gb"])
    return max(1, math.ceil(max((n.memory_bytes for n in needs), default=GB) / GB))


def check_slurm(launcher: dict, cells, where: str) -> None:
    from vlmforge.launch import slurm_cells

    part = slurm_cells.partition(launcher.get("partition"), where=f"hydra.launcher.partition of {where}")
    cpus = launcher.get("cpus_per_task") or 1
    needs = {c.name: cell_resources(c.checkpoint, c.cache_dir, c.validate, c.target, {"num_cpus": cpus}) for c in cells}
    mem_gb = slurm_mem_gb(launcher, needs.values())
    if cpus > part.cpus or mem_gb * 1024 > part.memory_mb:
        raise RecipeError(
            f"a cell asks Slurm for {cpus} CPUs and {mem_gb} GB; the largest node of partition {part.name!r} has "
            f"{part.cpus} CPUs and {part.memory_mb / 1024:.1f} GB, so the jobs would pend forever",
            where=f"hydra.launcher.cpus_per_task / mem_gb of {where}",
            fix=f"set hydra.launcher.cpus_per_task<={part.cpus} hydra.launcher.mem_gb<={int(part.memory_mb // 1024)}, "
                "or pick a larger partition")
    for name, need in needs.items():
        if need.memory_bytes > mem_gb * GB:
            log.warning("cell %s may need %.1f GB (estimated from its checkpoint); the jobs ask for %s GB "
                        "(hydra.launcher.mem_gb)", name, need.memory_bytes / GB, mem_gb)


def check_plan_launch(plan) -> None:
    """The engine-side checks; call after the fixtures are written (memory estimates read their headers)."""
    kind = launcher_kind(plan.launcher_target)
    if kind == "ray":
        check_ray(plan.launcher, plan.cells, plan.launcher_where)
    elif kind == "slurm":
        check_slurm(plan.launcher, plan.cells, plan.launcher_where)


def check_plan_cache(plan) -> None:
    """Before anything is written: the fixtures and every stage go through the cache's locks."""
    for cache_dir in sorted({c.cache_dir for c in plan.cells}):
        check_cache_locks(cache_dir)
