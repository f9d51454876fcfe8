"""Greedy token agreement with HF generate: FP32 accepts a divergence only at a near-tie below its rounding
bound (near_tie_rel x the step's largest |logit|); any wider gap is a failure."""

from __future__ import annotations

import numpy as np

from vlmforge.validators.chain import token_agreement


def _logits(steps: int, vocab: int, gap_at: int, gap: float) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    logits = rng.uniform(-10, 10, (steps, vocab)).astype(np.float32)
    hf = [int(np.argmax(row)) for row in logits]
    runner_up = int(np.argsort(logits[gap_at])[-2])
    logits[gap_at, runner_up] = logits[gap_at, hf[gap_at]] - gap
    return logits, hf


def test_fp32_divergence_at_a_tie_below_the_rounding_bound_is_agreement():
    logits, hf = _logits(8, 50, 5, 8.6e-6)  # the gap measured on the full-depth 3B; |logits| up to 10
    ours = hf[:5] + [int(np.argsort(logits[5])[-2])] + [0, 0]
    values, where = token_agreement(ours, hf, logits, None, 5e-5)
    assert values == {"token_match": 1.0, "raw_token_match": 5 / 8}
    assert "near-tie at step 5" in where and "max|logit|" in where


def test_fp32_divergence_at_a_real_gap_fails():
    logits, hf = _logits(8, 50, 5, 0.01)  # 0.01 > 5e-5 x 10
    ours = hf[:5] + [int(np.argsort(logits[5])[-2])] + [0, 0]
    values, where = token_agreement(ours, hf, logits, None, 5e-5)
    assert values["token_match"] == 5 / 8 and "first divergence at step 5" in where


def test_without_a_tie_allowance_tokens_must_be_identical():
    logits, hf = _logits(8, 50, 5, 1e-9)
    ours = hf[:5] + [int(np.argsort(logits[5])[-2])] + [0, 0]
    assert token_agreement(ours, hf, logits, None)[0]["token_match"] == 5 / 8
    assert token_agreement(hf, hf, logits, None, 5e-5) == ({"token_match": 1.0, "raw_token_match": 1.0}, "all 8 identical")
