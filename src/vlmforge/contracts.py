"""Graph I/O contracts as data: the single source of truth for names, dtypes and dims.

The exporter names its inputs/outputs from these, the contract validator checks the ONNX graph against
them, the manifest records them and the runtime binds by them. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "float32", "float16", "int64"
    shape: tuple[Dim, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StageContract:
    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.stage)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.stage)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    def with_float_dtype(self, dtype: str) -> "StageContract":
        """The same contract with every float tensor re-typed (FP16 graphs with FP16 I/O)."""

        def re(t: TensorSpec) -> TensorSpec:
            return TensorSpec(t.name, dtype, t.shape) if t.dtype.startswith("float") else t

        return StageContract(self.stage, tuple(map(re, self.inputs)), tuple(map(re, self.outputs)), self.meta)


def _by_name(specs: tuple[TensorSpec, ...], name: str, stage: str) -> TensorSpec:
    for t in specs:
        if t.name == name:
            return t
    raise KeyError(f"{stage} contract has no tensor {name!r}; it has {[t.name for t in specs]}")


def diff_contract(actual: list[TensorSpec], declared: tuple[TensorSpec, ...], kind: str) -> list[str]:
    """What differs between a graph's I/O and the contract (names in order, dtypes, every dim): [] if nothing."""
    problems = []
    names_a, names_d = [t.name for t in actual], [t.name for t in declared]
    if names_a != names_d:
        problems.append(f"{kind} names {names_a} != contract {names_d}")
    by_name = {t.name: t for t in actual}
    for want in declared:
        got = by_name.get(want.name)
        if got is None:
            continue
        if got.dtype != want.dtype:
            problems.append(f"{kind} {want.name!r} is {got.dtype}; contract says {want.dtype}")
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{kind} {want.name!r} has shape {list(got.shape)}; contract says {list(want.shape)}")
    return problems
