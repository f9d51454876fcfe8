"""The submitting process's view of the cells while an engine runs them: queued, running, done, failed.

State lives on the filesystem every worker shares with the submitter (the same one `out_dir` must be on):
a cell writes `<cell>.started.json` when it begins and `<cell>.result.json` when it ends, whichever engine
runs it. A cell whose worker dies never writes its result; the launcher, which sees the engine report the
death, writes a FAILED result carrying the engine's reason, so the final table and a re-run see one truth.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vlmforge.launch")

STATES = ("queued", "running", "done", "failed")


def started_file(result_file: str | Path) -> Path:
    name = Path(result_file).name.removesuffix(".result.json")
    return Path(result_file).with_name(f"{name}.started.json")


def _write_json(path: Path, data: dict) -> None:
    """Temp file + rename: a reader on another host sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def mark_started(result_file: str | Path, cell: str) -> None:
    """Called by the cell itself, first thing in its worker: the submitter then shows it running."""
    info = {"cell": cell, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    if os.environ.get("SLURM_ARRAY_JOB_ID"):  # what scancel takes: <array job>_<task>
        info["slurm_job"] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    elif os.environ.get("SLURM_JOB_ID"):
        info["slurm_job"] = os.environ["SLURM_JOB_ID"]
    _write_json(started_file(result_file), info)


def mark_queued(result_file: str | Path) -> None:
    """Called by the launcher before it submits: a state left by an earlier run never counts for this one."""
    for p in (Path(result_file), started_file(result_file)):
        p.unlink(missing_ok=True)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def record_failure(result_file: str | Path, cell: str, log_file: str, reason: str) -> dict:
    """The FAILED result of a cell whose worker died before it could write one (a result it did write wins)."""
    done = read_json(Path(result_file))
    if done is not None:
        return done
    started = read_json(started_file(result_file)) or {}
    result = {"cell": cell, "status": "FAILED", "log": log_file, "error": reason}
    if "started" in started:
        result.update(pid=started.get("pid"), host=started.get("host"),
                      seconds=round(time.time() - started["started"], 1))
    _write_json(Path(result_file), result)
    return result


@dataclass
class CellView:
    name: str
    result_file: str
    state: str = "queued"
    worker: tuple | None = None  # (host, pid) of the last worker seen running it


class Watch:
    """Logs each cell's change of state and a one-line count, and a heartbeat while nothing changes."""

    def __init__(self, cells: list[tuple[str, str]], engine: str, heartbeat_s: float = 30.0) -> None:
        self.cells = [CellView(name, result) for name, result in cells]
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self.t0 = time.monotonic()
        self.last = 0.0

    def _state(self, c: CellView) -> tuple[str, dict]:
        result = read_json(Path(c.result_file))
        if result is not None:
            return ("done" if result.get("status") == "ok" else "failed"), result
        started = read_json(started_file(c.result_file))
        return ("running", started) if started is not None else ("queued", {})

    def poll(self) -> dict[str, int]:
        changed = False
        for c in self.cells:
            state, info = self._state(c)
            worker = (info.get("host"), info.get("pid")) if state == "running" else None
            if state != c.state or (worker and c.worker and worker != c.worker):  # a new worker: the engine retried
                changed = True
                again = " again, the previous worker died" if state == c.state else ""
                c.state, c.worker = state, worker or c.worker
                log.info("cell %s: %s%s", c.name, _describe(state, info), again)
        counts = self.counts()
        now = time.monotonic()
        if changed or now - self.last >= self.heartbeat_s:
            self.last = now
            log.info("matrix on %s: %s (%.0f s)", self.engine,
                     ", ".join(f"{counts[s]} {s}" for s in STATES), now - self.t0)
        return counts

    def counts(self) -> dict[str, int]:
        return {s: sum(c.state == s for c in self.cells) for s in STATES}


def _describe(state: str, info: dict) -> str:
    if state == "running":
        return f"running (pid {info.get('pid')} on {info.get('host')})"
    if state == "done":
        return f"done in {info.get('seconds', 0):.1f} s"
    if state == "failed":
        return f"{info.get('status', 'FAILED')}: {info.get('error', '')[:200]}"
    return state
