"""Slurm facts the matrix needs, from the client commands (sinfo, squeue, scontrol), bounded in time.

The submitting process follows its job array with squeue (not sacct: a cluster without accounting storage,
such as scripts/slurm_local.sh's, has no sacct, and submitit's own watcher then never sees a cancelled job
end). A job that leaves the queue without a result was killed; scontrol says how while the controller still
remembers it (MinJobAge).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from vlmforge.core.errors import RecipeError

TIMEOUT_S = 20
FIX_CLUSTER = ("start the one-node cluster (sudo scripts/slurm_local.sh up), or run on a submit host of your cluster "
               "(SLURM_CONF pointing at its slurm.conf)")


def _run(argv: list[str], where: str) -> str:
    if shutil.which(argv[0]) is None:
        raise RecipeError(f"the Slurm client command {argv[0]!r} is not installed", where=where,
                          fix="install Slurm's client commands (Debian: apt-get install slurm-client), or " + FIX_CLUSTER)
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RecipeError(f"{' '.join(argv)} did not answer within {TIMEOUT_S} s", where=where, fix=FIX_CLUSTER) from None
    if run.returncode != 0:
        raise RecipeError(f"{' '.join(argv)} failed: {' '.join(run.stderr.split())[:300]}", where=where, fix=FIX_CLUSTER)
    return run.stdout


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    up: bool
    cpus: int  # the largest node's
    memory_mb: int


def partitions(where: str) -> dict[str, Partition]:
    out: dict[str, Partition] = {}
    for line in _run(["sinfo", "-h", "-N", "-o", "%P|%a|%c|%m"], where).splitlines():
        name, avail, cpus, mem = (line.split("|") + ["", "", "", ""])[:4]
        default, name = name.endswith("*"), name.rstrip("*")
        cpus_n, mem_n = int(cpus.rstrip("+") or 0), int(mem.rstrip("+") or 0)
        old = out.get(name)
        out[name] = Partition(name, default, avail == "up", max(cpus_n, old.cpus if old else 0),
                              max(mem_n, old.memory_mb if old else 0))
    return out


def partition(name: str | None, where: str) -> Partition:
    known = partitions(where)
    if name is None:
        default = next((p for p in known.values() if p.default), None)
        if default is None:
            raise RecipeError("the Slurm cluster has no default partition", where=where,
                              fix=f"set hydra.launcher.partition to one of {sorted(known)}")
        return default
    if name not in known:
        raise RecipeError(f"Slurm partition {name!r} does not exist (sinfo lists {sorted(known)})", where=where,
                          fix=f"set hydra.launcher.partition to one of {sorted(known)} (or null for the default)")
    if not known[name].up:
        raise RecipeError(f"Slurm partition {name!r} is not up", where=where,
                          fix="bring it up (scontrol update partitionname=... state=up) or pick another partition")
    return known[name]


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} of the jobs still in the queue (array tasks expanded)."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    run = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T"], capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    if run.returncode != 0:  # "Invalid job id specified" once every job of the arrays has left the queue
        return {}
    return dict(line.split("|", 1) for line in run.stdout.splitlines() if "|" in line)


def end_reason(job_id: str) -> str:
    """How a job ended, from scontrol (e.g. 'CANCELLED (Reason=None)'), or a plain sentence if forgotten."""
    try:
        run = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "ended without a result"
    fields = dict(kv.split("=", 1) for kv in run.stdout.split() if "=" in kv)
    if "JobState" not in fields:
        return "ended without a result (the controller no longer knows the job)"
    return f"{fields['JobState']} (Reason={fields.get('Reason', '?')}, ExitCode={fields.get('ExitCode', '?')})"
