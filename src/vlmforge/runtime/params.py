"""Generation options of the runtime's Python API: `SamplingParams`, checked before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlmforge.core.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self, where: str) -> None:
        rules = (
            ("max_new_tokens", isinstance(self.max_new_tokens, (int, np.integer)) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 = off)"),
            ("seed", self.seed is None or isinstance(self.seed, (int, np.integer)), "an integer or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        )
        for name, ok, valid in rules:
            if not ok:
                raise InputError(f"{name}={getattr(self, name)!r} is out of range", where=f"{where}({name}=...)",
                                 fix=f"pass {name} as {valid}")


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def params_from(kwargs: dict, where: str) -> SamplingParams:
    """The SamplingParams of keyword options (`stop` may be one string); InputError for an unknown option."""
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InputError(f"unknown generation option(s) {unknown}", where=where, fix=f"use {sorted(known)}")
    if "stop" in kwargs:
        stop = kwargs["stop"]
        kwargs = {**kwargs, "stop": (stop,) if isinstance(stop, str) else tuple(stop or ())}
    return SamplingParams(**kwargs)
