"""Graph I/O contracts as data: the single source of truth for names, dtypes and dims.

The exporter names its inputs/outputs from these, the contract validator checks the ONNX graph against
them, the manifest records them and the runtime binds by them (its KV layout too: `KVLayout.from_contract`,
the one place that reads a KV cache layout from names and shapes). No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from vlmforge.core.errors import ContractError

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

    @classmethod
    def from_json(cls, stage: str, data: dict, meta: dict | None = None) -> "StageContract":
        """The inverse of `to_json` (a manifest component's "inputs"/"outputs")."""
        spec = lambda t: TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))  # noqa: E731
        return cls(stage, tuple(map(spec, data["inputs"])), tuple(map(spec, data["outputs"])), dict(meta or {}))

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


@dataclass(frozen=True)
class KVLayout:
    """The decoder's KV cache as the runtime binds it: read from the decoder contract, in one place."""

    num_layers: int
    kv_heads: int
    head_dim: int
    deepstack_layers: int
    hidden: int

    @classmethod
    def from_contract(cls, decoder: StageContract, where: str = "", error=None) -> "KVLayout":
        """From the decoder's I/O: flat `past_key_values.{i}.key/value` inputs [B, kv_heads, P, head_dim] with
        `present.{i}.key/value` outputs for i = 0..N-1, `inputs_embeds` [B, S, hidden], and optionally
        `deepstack_embeds` [L, B, S, hidden]. `error` is the VlmforgeError subclass to raise (default
        ContractError; a runtime reading a manifest raises ArtifactError)."""
        error = error or ContractError
        inputs, outputs = set(decoder.input_names), set(decoder.output_names)
        layers = sorted(int(n.split(".")[1]) for n in inputs
                        if n.startswith(PAST_PREFIX) and n.endswith(".key") and n.split(".")[1].isdigit())
        missing = [n for i in layers for n in (past_name(i, "value"),) if n not in inputs]
        missing += [n for i in layers for kind in ("key", "value") if (n := present_name(i, kind)) not in outputs]
        if not layers or layers != list(range(len(layers))) or missing or "inputs_embeds" not in inputs:
            raise error(
                f"decoder contract has past key inputs for layers {layers}"
                + (f", lacks {missing[:4]}" if missing else "") + ("" if "inputs_embeds" in inputs else ", no inputs_embeds")
                + "; expected flat past_key_values.{i}.key/value inputs and present.{i}.key/value outputs for 0..N-1",
                where=where or f"{decoder.stage} contract",
                fix="export (or rebuild) the decoder with this vlmforge version",
            )
        kv = decoder.input(past_name(0, "key")).shape
        deep = decoder.input("deepstack_embeds").shape[0] if "deepstack_embeds" in inputs else 0
        hidden = decoder.input("inputs_embeds").shape
        dims = (kv[1:2], kv[3:4], hidden[2:3])
        if not all(len(d) == 1 and isinstance(d[0], int) for d in dims) or not isinstance(deep, int):
            raise error(f"decoder contract has no fixed KV heads / head size / hidden size (past {list(kv)}, "
                        f"inputs_embeds {list(hidden)})", where=where or f"{decoder.stage} contract",
                        fix="export (or rebuild) the decoder with this vlmforge version")
        return cls(len(layers), kv[1], kv[3], deep, hidden[2])


PAST_PREFIX = "past_key_values."


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


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
