"""onnxruntime sessions for the graph pass of a validation: opened on first use, closed per stage.

At real widths every session holds a copy of its graph's weights (the decoder of a 3B: ~12 GB as FP32).
The per-stage checks need one graph each, so `keep(stage)` closes the others before the next opens; the
chain needs all three, but never vision beside the other two (`exclusive_vision`). Transformed and FP32 sessions are never open together (suite.fp32_outputs runs the
FP32 graphs first, one at a time, and keeps only their outputs)."""

from __future__ import annotations

import logging
from pathlib import Path

from vlmforge.core.memory import give_back
from vlmforge.core.contracts import KVLayout, StageContract
from vlmforge.runtime.engine import Engine, Graph

log = logging.getLogger(__name__)
STAGE_NAMES = ("vision", "embedding", "decoder")


class StagedEngine(Engine):
    """An Engine (same calls, same numbers) whose three sessions open lazily and close on `keep`."""

    def __init__(self, paths: dict[str, Path], layout: KVLayout, providers=None) -> None:
        # Engine.__init__ is not called: it opens all three sessions at once.
        self._paths = paths
        self._providers = list(providers) if providers else None
        self._open: dict[str, Graph] = {}
        self.layout = layout
        self.exclusive_vision = False  # True: opening vision closes the others and the others close vision

    def _graph(self, stage: str) -> Graph:
        if self.exclusive_vision and stage not in self._open:
            # the chain: vision alone, then embedding + decoder (a 3B's 2.5 GiB FP32 vision graph was resident
            # beside the 12 GB decoder: the build's peak); reopening a graph gives the same numbers
            self.keep(*(() if stage == "vision" else tuple(s for s in self._open if s != "vision")))
        if stage not in self._open:
            log.debug("opening %s", self._paths[stage])
            self._open[stage] = Graph(self._paths[stage], self._providers)
        return self._open[stage]

    vision = property(lambda self: self._graph("vision"))
    embedding = property(lambda self: self._graph("embedding"))
    decoder = property(lambda self: self._graph("decoder"))

    def keep(self, *stages: str) -> "StagedEngine":
        """Close every session but `stages` (the memory of a closed one is back before the next opens)."""
        closed = [s for s in self._open if s not in stages]
        for s in closed:
            del self._open[s]
        if closed:
            give_back()
        return self

    def close(self) -> None:
        self.keep()


def staged_engine(directory: Path, contracts: dict[str, StageContract], providers=None,
                  fallback: Path | None = None) -> StagedEngine:
    """Sessions over `directory`; a stage missing there is taken from `fallback` (FP32 stages of a mixed build)."""
    def path(stage: str) -> Path:
        p = directory / f"{stage}.onnx"
        return p if p.exists() or fallback is None else fallback / f"{stage}.onnx"

    return StagedEngine({s: path(s) for s in STAGE_NAMES}, KVLayout.from_contract(contracts["decoder"]), providers)
