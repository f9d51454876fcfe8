"""Shared, session-scoped builds: each artifact set the tests need is built once per run."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per CPU: one OpenMP thread each (torch, and the builds they start). Measured on
    # a tiny build, 2 threads against 1: 51 CPU-s against 37 for 16 % less wall time alone; side by side with a
    # second worker, the spinning second thread only takes the other worker's core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def compose(*overrides: str):
    from vlmforge.recipe import compose as _compose

    return _compose(list(overrides), RECIPES)


@pytest.fixture(scope="session")
def work_dirs(tmp_path_factory):
    """Each process writes its own artifact sets; the stage cache (atomic entries, built for parallel cells) is
    shared by all of a run's pytest-xdist workers, so a set one worker built is a cache hit for the other."""
    root = tmp_path_factory.mktemp("vlmforge")
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    return {"out": root / "artifacts", "cache": shared / "vlmforge-cache"}


def seed_cache(session_cache: Path, cache: Path, family: str, stages: tuple[str, ...]) -> None:
    """Copy the session's finished entries of `stages` into a test's own fresh cache (never a temp folder or a
    lock: only `<key>/` entries), so the test exports only the stage it is about."""
    for stage in stages:
        src = session_cache / "stages" / family / stage
        for entry in src.iterdir():
            if not entry.name.startswith(".") and entry.is_dir():
                shutil.copytree(entry, cache / "stages" / family / stage / entry.name)


@pytest.fixture(scope="session")
def build(work_dirs):
    """build(*overrides) -> BuildReport, memoised per override tuple for the whole session."""
    from vlmforge.build import run_build

    done: dict[tuple, object] = {}

    def _build(*overrides: str):
        key = tuple(overrides)
        if key not in done:
            cfg = compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", *overrides)
            # One worker builds a set while the other waits, then finds every node in the shared cache.
            lock = work_dirs["cache"].parent / f"build-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}.lock"
            with FileLock(str(lock)):
                done[key] = run_build(cfg)
        return done[key]

    return _build


# The artifact sets many tests share, by fixture name (built once per run, on first use).
SESSION_SETS = {
    "qwen25_392": ("model=tiny_qwen2_5_vl", "vision=small"),
    "qwen3_384": ("model=tiny_qwen3_vl", "vision=small"),
    "qwen3_384_drop": ("model=tiny_qwen3_vl", "vision=small", "model.deepstack=drop"),
    # The vision=dynamic builds (one per family, shared by every dynamic test). Their embedding and decoder are
    # the fixed builds' cache entries; 16 chain tokens per prompt (of 5 prompts) keep the validation short.
    "qwen25_dynamic": ("model=tiny_qwen2_5_vl", "vision=dynamic", "validate.chain_tokens=16"),
    "qwen3_dynamic": ("model=tiny_qwen3_vl", "vision=dynamic", "validate.chain_tokens=16"),
    # The only dynamic Qwen3-VL variant onnxruntime-genai and transformers.js run (neither has a DeepStack path).
    "qwen3_dynamic_drop": ("model=tiny_qwen3_vl", "vision=dynamic", "model.deepstack=drop", "validate.chain_tokens=16"),
    # A non-square fixed size (vision.size=HxW): only its vision graph is new (embedding and decoder: the cache
    # entries of qwen25_392); 196 px is no multiple of the 112-px window, so edge windows are short.
    "qwen25_196x336": ("model=tiny_qwen2_5_vl", "vision.size=196x336", "validate.chain_tokens=16"),
}


def _session_set(name: str):
    @pytest.fixture(scope="session", name=name)
    def _fixture(build):
        return build(*SESSION_SETS[name])

    return _fixture


# One session fixture per shared set, named as in SESSION_SETS (qwen25_392, qwen3_384, ...).
for _name in SESSION_SETS:
    globals()[_name] = _session_set(_name)


@pytest.fixture(scope="session", autouse=True)
def _session_sets_split_between_workers(request, build):
    """Under pytest-xdist, worker i of n first builds every n-th shared set that a collected test needs, so the
    workers build different sets at the same time instead of one waiting on the other's lock."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2:
        return
    needed = [name for name in SESSION_SETS if any(name in item.fixturenames for item in request.session.items)]
    for name in needed[int(worker.removeprefix("gw")) :: count]:
        build(*SESSION_SETS[name])


def pytest_collection_modifyitems(config, items):
    """The modules that hold a slow test run first (stable otherwise), so that under `--dist loadscope`
    scheduling the long ones start early and the run does not end on one worker alone."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
