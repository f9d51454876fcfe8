"""The parity metrics: max_rel is the error at the output's own scale, so the same relative error passes
or fails the same FP32 gate whatever the logits' magnitude (the absolute bound did not)."""

from __future__ import annotations

import numpy as np

from vlmforge.validators.metrics import compare, metrics


def test_max_rel_is_scale_free_and_gates():
    rng = np.random.default_rng(0)
    want = rng.standard_normal((4, 50)).astype(np.float32)
    noise = rng.standard_normal(want.shape).astype(np.float32) * 1e-6
    small = metrics(want + noise, want)
    big = metrics(30 * (want + noise), 30 * want)
    assert np.isclose(small["max_rel"], big["max_rel"], rtol=1e-3)
    assert np.isclose(big["max_abs"], 30 * small["max_abs"], rtol=1e-2)
    assert small["max_rel"] == small["max_abs"] / np.abs(want).max()
    tol = {"max_rel": 5e-5}
    assert all(c.passed for c in compare("decoder", "scaled", 30 * (want + noise), 30 * want, tol))
    broken = 30 * want
    broken[0, 0] += 30 * 1e-3 * np.abs(want).max()  # one logit off by 1e-3 of the scale: a real bug
    assert not any(c.passed for c in compare("decoder", "broken", broken, 30 * want, tol))
