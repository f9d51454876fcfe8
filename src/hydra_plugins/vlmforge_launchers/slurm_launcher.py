"""`hydra/launcher=slurm`: the matrix as one Slurm job array, through hydra-submitit-launcher.

The plugin's SlurmLauncher submits the array and then waits on `job.results()` in order; that raises at the
first cancelled job (leaving the others unwatched) and, without Slurm accounting, never notices a cancelled
job at all (submitit asks sacct). This subclass keeps its submission (same recipe keys, same job body) and
replaces the wait: squeue for what is queued or running, the result pickle for what finished, scontrol for
how a job that vanished ended. Progress shows while it waits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.vlmforge_launchers.common import cell_files, job_return

log = logging.getLogger("vlmforge.launch")
VANISHED_GRACE_S = 10.0  # a job gone from squeue may still be flushing its result pickle (NFS)

try:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the `slurm` extra is not installed: vlmforge's preflight says so before Hydra runs
    SlurmLauncher = None

if SlurmLauncher is not None:

    class VlmforgeSlurmLauncher(SlurmLauncher):
        def __init__(self, poll_s: float = 2.0, heartbeat_s: float = 30.0, **params: Any) -> None:
            super().__init__(**params)
            self.poll_s, self.heartbeat_s = float(poll_s), float(heartbeat_s)

        def _executor(self):
            """The plugin's own executor set-up (BaseSubmititLauncher.launch, up to the submission)."""
            import submitit

            init_keys = {"submitit_folder", "max_num_timeout"}
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                             slurm_max_num_timeout=self.params.get("max_num_timeout", 0))
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                          for k, v in self.params.items() if k not in init_keys})
            return executor

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            from vlmforge.launch.watch import Watch, mark_queued

            Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
            params: List[Any] = []
            cells = []
            for i, overrides in enumerate(job_overrides):
                name, log_file, result_file = cell_files(self.task_function, overrides)
                mark_queued(result_file)
                log.info("cell %s -> Slurm array task %d: %s", name, i, " ".join(filter_overrides(overrides)))
                params.append((list(overrides), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{i}",
                               Singleton.get_state()))
                cells.append((name, log_file, result_file))
            self.params["mem_gb"] = self._mem_gb(job_overrides, initial_job_idx)
            jobs = self._executor().map_array(self, *zip(*params))
            log.info("submitted Slurm job array %s (%d tasks); submitit files in %s", jobs[0].job_id.split("_")[0],
                     len(jobs), self.params["submitit_folder"])
            watch = Watch([(c[0], c[2]) for c in cells], "Slurm", self.heartbeat_s)
            by_id = {job.job_id: (job, overrides, cell) for job, overrides, cell in zip(jobs, job_overrides, cells)}
            returns = self._wait(by_id, watch)
            return [returns[job.job_id] for job in jobs]

        def _mem_gb(self, job_overrides, initial_job_idx: int) -> int:
            """One array, one --mem: the recipe's mem_gb, or (null) the largest cell's estimate."""
            from hydra_plugins.vlmforge_launchers.common import sweep_config
            from vlmforge.launch.preflight import slurm_mem_gb
            from vlmforge.launch.resources import cell_resources

            if self.params.get("mem_gb"):
                return int(self.params["mem_gb"])
            cfgs = [sweep_config(self, o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
            needs = [cell_resources(str(c.model.checkpoint), str(c.cache_dir), bool(c.validate.enabled),
                                    str(c.target.name), {}) for c in cfgs]
            mem_gb = slurm_mem_gb({}, needs)
            log.info("Slurm jobs ask for --mem=%dG (the largest cell's estimate; set hydra.launcher.mem_gb to choose)",
                     mem_gb)
            return mem_gb

        def _wait(self, by_id: dict, watch) -> dict:
            """{job id: JobReturn} for every job; a job that ended without a good result is recorded as the
            cell's failure the moment it is seen, so progress shows it at once."""
            from vlmforge.launch.slurm_cells import end_reason, queue_states

            pending, out, gone_since = dict(by_id), {}, {}
            while pending:
                queued = queue_states(list(pending))
                for job_id, (job, overrides, cell) in list(pending.items()):
                    if job.paths.result_pickle.exists():
                        outcome = _load(job)
                    elif job_id in queued:
                        gone_since.pop(job_id, None)
                        continue
                    elif time.monotonic() - gone_since.setdefault(job_id, time.monotonic()) > VANISHED_GRACE_S:
                        outcome = ("vanished", f"Slurm job {job_id} {end_reason(job_id)}")
                    else:
                        continue
                    out[job_id] = _job_return(job, overrides, cell, outcome)
                    del pending[job_id]
                watch.poll()
                if pending:
                    time.sleep(self.poll_s)
            return out


def _job_return(job, overrides, cell, outcome) -> JobReturn:
    from vlmforge.launch.watch import record_failure

    kind, value = outcome
    if kind == "success" and isinstance(value, JobReturn) and value.status == JobStatus.COMPLETED:
        return value
    name, log_file, result_file = cell
    reason = value if kind == "vanished" else f"Slurm job {job.job_id} failed: {str(value).strip()[-300:]}"
    log.error("cell %s: %s", name, reason)
    return job_return(None, overrides, record_failure(result_file, name, log_file, reason))


def _load(job):
    from submitit.core import utils

    try:
        return utils.pickle_load(job.paths.result_pickle)
    except (EOFError, OSError) as exc:  # a pickle still being written: the next poll reads it
        return ("error", f"unreadable result {job.paths.result_pickle}: {exc}")
