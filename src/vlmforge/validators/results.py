"""Structured validation results: metric, value, tolerance, pass/fail. Validators report; the build decides."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CheckResult:
    stage: str
    name: str
    metric: str
    value: float | str | None
    tolerance: float | str | None
    passed: bool
    detail: str = ""
    kind: str = "graph"  # graph: same weights on both sides, holds on any weights | quality: vs FP32 or a task

    def to_json(self) -> dict:
        d = asdict(self)
        if isinstance(d["value"], float):
            d["value"] = float(f"{d['value']:.6g}")
        return d

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        val = f"{self.value:.3g}" if isinstance(self.value, float) else str(self.value)
        return f"{mark} {self.stage:<9} {self.name:<34} {self.metric} = {val} (tolerance {self.tolerance})"


def at_most(stage: str, name: str, metric: str, value: float, tolerance: float, detail: str = "") -> CheckResult:
    value = float(value)
    ok = bool(value <= tolerance) and value == value  # NaN never passes
    return CheckResult(stage, name, metric, value, float(tolerance), ok, detail)


def at_least(stage: str, name: str, metric: str, value: float, tolerance: float, detail: str = "") -> CheckResult:
    value = float(value)
    ok = bool(value >= tolerance) and value == value
    return CheckResult(stage, name, metric, value, float(tolerance), ok, detail)
