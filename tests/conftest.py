"""Shared, session-scoped builds: each artifact set the tests need is built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def compose(*overrides: str):
    from vlmforge.recipe import compose as _compose

    return _compose(list(overrides), RECIPES)


@pytest.fixture(scope="session")
def work_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlmforge")
    return {"out": root / "artifacts", "cache": root / "cache"}


@pytest.fixture(scope="session")
def build(work_dirs):
    """build(*overrides) -> BuildReport, memoised per override tuple for the whole session."""
    from vlmforge.build import run_build

    done: dict[tuple, object] = {}

    def _build(*overrides: str):
        key = tuple(overrides)
        if key not in done:
            cfg = compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", *overrides)
            done[key] = run_build(cfg)
        return done[key]

    return _build


@pytest.fixture(scope="session")
def qwen25_392(build):
    return build("model=tiny_qwen2_5_vl", "vision=small")


@pytest.fixture(scope="session")
def qwen3_384(build):
    return build("model=tiny_qwen3_vl", "vision=small")


@pytest.fixture(scope="session")
def qwen3_384_drop(build):
    return build("model=tiny_qwen3_vl", "vision=small", "model.deepstack=drop")


# The vision=dynamic builds (one per family, shared by every dynamic test). Their embedding and decoder are
# the fixed builds' cache entries; 16 chain tokens per prompt (of 5 prompts) keep the validation short.
@pytest.fixture(scope="session")
def qwen25_dynamic(build):
    return build("model=tiny_qwen2_5_vl", "vision=dynamic", "validate.chain_tokens=16")


@pytest.fixture(scope="session")
def qwen3_dynamic(build):
    return build("model=tiny_qwen3_vl", "vision=dynamic", "validate.chain_tokens=16")
