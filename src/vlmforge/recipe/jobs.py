"""The job each matrix cell runs: Hydra's task function, a cell's log file and its result record."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vlmforge.core.errors import VlmforgeError
from vlmforge.core.logs import quiet_noisy_loggers
from vlmforge.core.memory import peak_rss_mb, reset_peak
from vlmforge.recipe.cells import CELL_GROUP, cell_name

log = logging.getLogger("vlmforge")


@dataclass(frozen=True)
class MatrixJob:
    """Hydra's task function for one cell (picklable, so joblib/submitit/ray can ship it to a worker).
    A cell's failure is recorded, never raised: the other cells go on."""

    sweep_keys: tuple[str, ...]
    files: dict  # cell name -> (log file, result file)
    force: bool = False
    in_process: bool = True

    def cell(self, job_overrides) -> tuple[str, str, str]:
        """(cell name, log file, result file) of the job with these overrides: launchers report through them."""
        name = cell_name(job_overrides, self.sweep_keys)
        return (name, *self.files[name])

    def __call__(self, cfg) -> dict:
        from hydra.core.hydra_config import HydraConfig

        from vlmforge.build import run_build
        from vlmforge.progress import Progress
        from vlmforge.recipe.schema import from_omegaconf

        from vlmforge.launch.watch import mark_started

        name, log_file, result_file = self.cell(HydraConfig.get().overrides.task)
        mark_started(result_file, name)
        handlers = _cell_logging(name, Path(log_file), self.in_process)
        reset_peak()
        t0 = time.perf_counter()
        result = {"cell": name, "status": "FAILED", "log": log_file, "pid": os.getpid(), "started": time.time()}
        try:
            build_cfg = from_omegaconf(cfg, recipe=f"recipes/build.yaml +{CELL_GROUP}={name}")
            report = run_build(build_cfg, recipe=f"cell {name}", force=self.force,
                               progress=Progress(enabled=None if self.in_process else False))
            result.update(status="ok", directory=str(report.directory), cache=report.cache_summary(),
                          checks=len(report.checks))
        except VlmforgeError as err:
            log.error("cell %s failed:\n%s", name, err.render())
            result.update(error=f"{err.kind}: {err.what}")
        except Exception as err:  # a bug met by one cell must not stop the others; its traceback is in its log
            handlers[0].handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "cell %s crashed", (name,),
                                              sys.exc_info()))  # the traceback goes to the cell's log file only
            log.error("cell %s crashed (%s: %s); the traceback is in %s", name, type(err).__name__,
                      str(err).splitlines()[0][:200] if str(err) else "", log_file)
            result.update(status="CRASHED", error=f"{type(err).__name__}: {err}")
        finally:
            result.update(seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=peak_rss_mb(), ended=time.time())
            Path(result_file).parent.mkdir(parents=True, exist_ok=True)
            Path(result_file).write_text(json.dumps(result, indent=2) + "\n")
            for h in handlers:
                logging.getLogger().removeHandler(h)
                h.close()
        return result


def _cell_logging(name: str, log_file: Path, in_process: bool) -> list[logging.Handler]:
    """The cell's log file; in a fresh worker process (no handlers yet) also stderr, prefixed by the cell."""
    root = logging.getLogger()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.FileHandler(log_file, mode="w")]
    if not in_process or not root.handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    quiet_noisy_loggers()
    return handlers


