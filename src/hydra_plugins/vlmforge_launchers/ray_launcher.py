"""`hydra/launcher=ray`: one Ray task per matrix cell, sized per cell (vlmforge.launch.ray_cells)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.vlmforge_launchers.common import cell_files, job_return, sweep_config

log = logging.getLogger("vlmforge.launch")


def _run_job(hydra_context, cfg, task_function, singleton_state) -> JobReturn:
    """What runs inside the Ray worker: Hydra's own job runner (working dir, job config) around the cell."""
    from hydra.core.hydra_config import HydraConfig

    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(cfg)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=cfg,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


class VlmforgeRayLauncher(Launcher):
    def __init__(self, init: Any = None, cell: Any = None, max_retries: int = 1, poll_s: float = 1.0,
                 heartbeat_s: float = 30.0) -> None:
        as_dict = lambda c: OmegaConf.to_container(c, resolve=True) if OmegaConf.is_config(c) else dict(c or {})  # noqa: E731
        self.init, self.cell = as_dict(init), as_dict(cell)
        self.max_retries, self.poll_s, self.heartbeat_s = int(max_retries), float(poll_s), float(heartbeat_s)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        from vlmforge.launch import ray_cells
        from vlmforge.launch.resources import cell_resources
        from vlmforge.launch.watch import Watch, mark_queued

        setup_globals()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        ray_cells.connect(self.init, where="hydra.launcher.init")
        remote = ray.remote(_run_job)
        # Shared by every cell: into the object store once (pickling the Hydra context per task cost ~0.6 s each).
        shared = [ray.put(x) for x in (self.hydra_context, self.task_function, Singleton.get_state())]
        jobs = []
        for i, overrides in enumerate(job_overrides):
            cfg = sweep_config(self, overrides, initial_job_idx + i)
            name, log_file, result_file = cell_files(self.task_function, overrides)
            need = cell_resources(str(cfg.model.checkpoint), str(cfg.cache_dir), bool(cfg.validate.enabled),
                                  str(cfg.target.name), self.cell)
            mark_queued(result_file)
            log.info("cell %s -> Ray task (%s): %s", name, need.describe(), " ".join(filter_overrides(overrides)))
            ref = remote.options(**ray_cells.remote_options(need, self.max_retries)).remote(
                shared[0], cfg, shared[1], shared[2])
            jobs.append((ref, cfg, overrides, name, log_file, result_file))
        watch = Watch([(j[3], j[5]) for j in jobs], "Ray", self.heartbeat_s)
        by_ref = {j[0]: j for j in jobs}
        returns = ray_cells.wait_all(list(by_ref), watch, self.poll_s, lambda ref, value: self._done(by_ref[ref], value))
        watch.poll()
        return [returns[j[0]] for j in jobs]

    def _done(self, job, value) -> JobReturn:
        """The cell's JobReturn; a task that ended without one (its worker died) is recorded as failed."""
        from vlmforge.launch import ray_cells
        from vlmforge.launch.watch import record_failure

        _, cfg, overrides, name, log_file, result_file = job
        if isinstance(value, JobReturn) and value.status == JobStatus.COMPLETED:
            return value
        reason = (f"the cell raised {value._return_value!r}" if isinstance(value, JobReturn)
                  else ray_cells.death_reason(value, self.max_retries))
        log.error("cell %s: %s", name, reason)
        return job_return(cfg, overrides, record_failure(result_file, name, log_file, reason))
