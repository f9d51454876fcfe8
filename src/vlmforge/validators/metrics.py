"""Comparison metrics between two tensors and the gate that turns recipe tolerances into checks.

A tolerance is a dict of metric -> bound. Error metrics (max_abs, max_rel, mean_abs) are upper bounds;
max_rel is max_abs over the reference's largest magnitude (the error at the output's own scale: FP32
rounding between two correct implementations grows with it); agreement
metrics (cosine, top1, top5, token_match) are lower bounds. Every metric is computed and recorded in the
check's detail; only the ones the recipe names gate the build.
"""

from __future__ import annotations

import numpy as np

from vlmforge.validators.results import CheckResult, at_least, at_most

UPPER = ("max_abs", "max_rel", "mean_abs", "accuracy_drop")
LOWER = ("cosine", "mean_cosine", "top1", "top5", "token_match", "answer_agreement")


def metrics(got: np.ndarray, want: np.ndarray, logits: bool = False) -> dict[str, float]:
    if got.shape != want.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "mean_abs": float("inf"), "cosine": -1.0, "mean_cosine": -1.0, "top1": 0.0, "top5": 0.0}
    if got.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0, "cosine": 1.0, "mean_cosine": 1.0, "top1": 1.0, "top5": 1.0}
    a = got.astype(np.float64).reshape(-1, got.shape[-1])
    b = want.astype(np.float64).reshape(-1, want.shape[-1])
    diff = np.abs(a - b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-300), 1.0)
    scale = float(np.abs(b).max())
    out = {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale if scale > 0 else float(diff.max()),
           "mean_abs": float(diff.mean()), "cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    if logits:
        out["top1"] = float((a.argmax(1) == b.argmax(1)).mean())
        k = min(5, a.shape[1])
        ta, tb = np.argsort(-a, 1)[:, :k], np.argsort(-b, 1)[:, :k]
        out["top5"] = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))
    return out


def gate(stage: str, name: str, values: dict[str, float], tol: dict) -> list[CheckResult]:
    """One CheckResult per metric the tolerance names; the other metrics ride along in `detail`."""
    detail = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    checks = []
    for metric, bound in tol.items():
        if metric not in values:
            continue
        fn = at_most if metric in UPPER else at_least
        checks.append(fn(stage, name, metric, values[metric], bound, detail))
    if not checks:
        raise KeyError(f"tolerance {tol} names none of the metrics {sorted(values)} for {stage}/{name}")
    return checks


def compare(stage: str, name: str, got: np.ndarray, want: np.ndarray, tol: dict, logits: bool = False) -> list[CheckResult]:
    return gate(stage, name, metrics(got, want, logits), tol)
