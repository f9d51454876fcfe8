"""What both vlmforge launchers share: one cell's sweep config, its files, its JobReturn."""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict


def sweep_config(launcher, overrides, idx: int):
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = f"job_id_for_{idx}"
        cfg.hydra.job.num = idx
    return cfg


def cell_files(task_function, overrides) -> tuple[str, str, str]:
    """(cell name, log file, result file) from vlmforge's MatrixJob; a plain task function gets none."""
    if hasattr(task_function, "cell"):
        return task_function.cell(list(overrides))
    return " ".join(overrides), "", ""


def job_return(cfg, overrides, value: Any) -> JobReturn:
    """A COMPLETED JobReturn carrying a cell's result record (failed cells too: Hydra's sweeper re-raises a
    FAILED JobReturn, which would stop it from collecting the cells that did finish)."""
    ret = JobReturn(overrides=list(overrides), cfg=cfg, hydra_cfg=None, working_dir=None,
                    task_name="export-all")
    ret.status = JobStatus.COMPLETED
    ret.return_value = value
    return ret
