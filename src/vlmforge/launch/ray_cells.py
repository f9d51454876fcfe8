"""Each matrix cell as one Ray task, with the resources the cell needs (recipes/hydra/launcher/ray.yaml).

Not hydra-ray-launcher 1.2.2: it gives every job the same `ray.remote` options (no per-cell memory), collects
results with `ray.get` in submission order (the first dead worker aborts the collection while other cells
still run), and pins `cloudpickle<3` and `ray[default]` + boto3. Here the submitting process waits with
`ray.wait`, shows progress, and records a dead worker as that cell's failure.

A local Ray (address null) is started on the loopback only (Ray's single-node mode,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); address=auto, host:port or ray://host:10001 joins a running cluster.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vlmforge.core.errors import RecipeError
from vlmforge.launch.resources import GB, CellResources

log = logging.getLogger("vlmforge.launch")

LOCAL_ONLY_KEYS = ("num_cpus", "num_gpus", "object_store_memory", "include_dashboard", "_memory")
PROBE_TIMEOUT_S = 5.0


def init_kwargs(init: dict) -> dict:
    """ray.init() arguments: None values dropped; for an existing cluster the local-only ones too.
    address null becomes "local": ray.init() without an address would join whatever cluster `ray start`
    last ran on this machine (even a dead one), not start the local Ray the recipe asks for."""
    out = {k: v for k, v in (init or {}).items() if v is not None}
    if out.get("address") in (None, "local"):
        out["address"] = "local"
    else:
        out = {k: v for k, v in out.items() if k not in LOCAL_ONLY_KEYS}
    return out


def auto_address() -> str | None:
    """What address=auto means, read without importing ray: RAY_ADDRESS, else the cluster `ray start` last
    started on this machine (<tmp>/ray/ray_current_cluster)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return current.read_text().strip() or None
    except OSError:
        return None


def host_port(address: str) -> tuple[str | None, int | None]:
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    return parsed.hostname, parsed.port


def probe_address(address: str, where: str) -> str:
    """A bounded TCP connect to the head before ray.init, which would otherwise retry for a minute or more.
    Returns the address to give ray.init (auto resolved)."""
    target = auto_address() if address == "auto" else address
    if target is None:
        raise RecipeError("no running Ray cluster found for address=auto (no RAY_ADDRESS, no cluster started on this "
                          "machine by `ray start`)", where=where,
                          fix="start one (ray start --head), set RAY_ADDRESS=<head>:6379, or leave "
                              "hydra.launcher.init.address=null to start a local Ray")
    host, port = host_port(target)
    if not host or not port:
        raise RecipeError(f"Ray address {address!r} is not host:port or ray://host:port", where=where,
                          fix="use auto, <head>:6379 or ray://<head>:10001")
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RecipeError(f"the Ray head at {host}:{port} does not answer ({exc.strerror or exc}; waited at most "
                          f"{PROBE_TIMEOUT_S:.0f} s)", where=where,
                          fix="check that the cluster is up (ray status on the head) and the address/port, or leave "
                              "hydra.launcher.init.address=null to start a local Ray") from None
    return target


def is_loopback(host: str | None) -> bool:
    try:
        return bool(host) and ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def connect(init: dict, where: str) -> None:
    """ray.init once per process: the preflight connects, the launcher then reuses the connection."""
    kwargs = init_kwargs(init)
    local = kwargs["address"] == "local"
    if not local:
        kwargs["address"] = probe_address(str(kwargs["address"]), where)
    if local or is_loopback(host_port(kwargs["address"])[0]):
        # A local Ray, or a cluster on this machine's loopback: Ray's single-node mode, set before ray is
        # imported, keeps it from rewriting 127.0.0.1 into the routable address (and binding to it).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(**kwargs)
    except (ValueError, TypeError, ConnectionError, RuntimeError) as exc:
        joining = not local
        raise RecipeError(
            f"ray.init {'could not join the cluster' if joining else 'refused the launcher settings'}: "
            f"{' '.join(str(exc).split())[:400]}", where=where,
            fix="check the cluster (ray status on the head); one started by `ray start` uses token authentication: "
                "export RAY_AUTH_MODE=token with its token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) here" if joining else
                "check hydra.launcher.init (num_cpus and object_store_memory apply to a local Ray only)") from None


@dataclass(frozen=True)
class Node:
    cpus: float
    memory: int
    gpus: float

    def holds(self, r: CellResources) -> bool:
        return r.num_cpus <= self.cpus and r.memory_bytes <= self.memory and r.num_gpus <= self.gpus


def nodes() -> list[Node]:
    import ray

    return [Node(n["Resources"].get("CPU", 0), int(n["Resources"].get("memory", 0)), n["Resources"].get("GPU", 0))
            for n in ray.nodes() if n.get("Alive")]


def check_fits(cells: dict[str, CellResources], where: str) -> None:
    """A task no node can hold would wait forever (Ray only warns 'infeasible'): refuse it up front."""
    alive = nodes()
    for name, need in cells.items():
        if not any(n.holds(need) for n in alive):
            biggest = max(alive, key=lambda n: (n.memory, n.cpus), default=Node(0, 0, 0))
            raise RecipeError(
                f"cell {name} needs {need.describe()}; no Ray node has that much (largest: {biggest.cpus:g} CPU, "
                f"{biggest.memory / GB:.1f} GB, {biggest.gpus:g} GPU; {len(alive)} node(s))", where=where,
                fix="lower hydra.launcher.cell.num_cpus / hydra.launcher.cell.memory_gb, or add a node that large")


def remote_options(need: CellResources, max_retries: int) -> dict:
    """Ray retries a task whose worker died (not one whose cell failed: a cell never raises)."""
    return {"num_cpus": need.num_cpus, "num_gpus": need.num_gpus, "memory": need.memory_bytes,
            "max_retries": max_retries, "retry_exceptions": False}


def wait_all(refs: list, watch, poll_s: float, on_done) -> dict:
    """{ref: on_done(ref, value or the RayError that ended it)}, called as each task ends (so a dead
    worker's cell shows failed at once), polling the cells' state files between completions."""
    import ray
    from ray.exceptions import RayError

    pending, out = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
        for ref in ready:
            try:
                value = ray.get(ref)
            except RayError as exc:
                value = exc
            out[ref] = on_done(ref, value)
        watch.poll()
    return out


def death_reason(exc: Exception, retries: int) -> str:
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    tried = f" (after {retries} retry)" if retries else ""
    return f"the Ray worker died{tried}: {type(exc).__name__}: {first[:240]}"


def elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 1)
