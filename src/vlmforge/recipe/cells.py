"""The matrix as data: its cells, the plan, a cell's name and files, and the table of their results.

`export-all` = Hydra's --multirun over recipes/build.yaml + recipes/matrix/<name>.yaml, whose
`hydra.sweeper.params` lists the cells (options of recipes/matrix/cell/). Planning is in
`vlmforge.recipe.matrix`, the job each cell runs in `vlmforge.recipe.jobs`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

CELL_GROUP = "matrix/cell"


@dataclass(frozen=True)
class Cell:
    name: str
    overrides: tuple[str, ...]  # this job's sweep choices (and the user's overrides)
    directory: str  # the artifact set it writes
    log: str
    result: str
    checkpoint: str
    cache_dir: str
    validate: bool = True  # what the cell's memory estimate depends on (vlmforge.launch.resources)
    target: str = "cpu"


@dataclass(frozen=True)
class MatrixPlan:
    matrix: str
    hydra_args: tuple[str, ...]  # what Hydra's own command line would be: +matrix=<name> + the user's overrides
    sweep_keys: tuple[str, ...]
    cells: tuple[Cell, ...]
    in_process: bool  # the basic launcher: jobs run in this process, one after the other
    launcher_target: str = ""
    launcher: dict = field(default_factory=dict)  # the resolved hydra.launcher node (engine preflight checks)
    launcher_where: str = ""


def cell_name(job_overrides, sweep_keys: tuple[str, ...]) -> str:
    """The cell's option of matrix/cell, then `key=value` for any other swept key."""
    parts = []
    for o in job_overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key == CELL_GROUP:
            parts.insert(0, value)
        elif key in sweep_keys:
            parts.append(f"{key}={value}")
    return ",".join(parts) or "default"


def file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def read_result(cell: Cell) -> dict:
    """The result record a cell's job wrote (vlmforge.recipe.jobs.MatrixJob), or one saying it wrote none."""
    try:
        return json.loads(Path(cell.result).read_text())
    except (OSError, json.JSONDecodeError):
        return {"cell": cell.name, "status": "NO RESULT", "log": cell.log,
                "error": "the job ended without writing its result (killed, or the launcher failed)"}


def matrix_table(rows: list[dict]) -> str:
    head = ("cell", "status", "seconds", "peak RSS MB", "cache hits", "result")
    body = [(r["cell"], r["status"], f"{r['seconds']:.1f}" if "seconds" in r else "-",
             f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-", r.get("cache", "-"),
             r.get("directory") or r.get("error", "")[:100]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])
