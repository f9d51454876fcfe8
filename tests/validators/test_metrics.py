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


def _whole_array_metrics(got, want):
    """The pre-chunking implementation (whole arrays in float64, full argsort), kept as the reference."""
    a = got.astype(np.float64).reshape(-1, got.shape[-1])
    b = want.astype(np.float64).reshape(-1, want.shape[-1])
    diff = np.abs(a - b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-300), 1.0)
    ta, tb = np.argsort(-a, 1, kind="stable")[:, :5], np.argsort(-b, 1, kind="stable")[:, :5]
    return {"max_abs": diff.max(), "max_rel": diff.max() / np.abs(b).max(), "mean_abs": diff.mean(),
            "cosine": cos.min(), "mean_cosine": cos.mean(), "top1": (a.argmax(1) == b.argmax(1)).mean(),
            "top5": np.mean([len(set(x) & set(y)) / 5 for x, y in zip(ta, tb)])}


def test_chunked_metrics_equal_the_whole_array_computation(monkeypatch):
    import vlmforge.validators.metrics as m

    rng = np.random.default_rng(1)
    want = rng.standard_normal((3, 7, 300)).astype(np.float32)
    got = (want + rng.standard_normal(want.shape).astype(np.float32) * 0.3).astype(np.float32)
    ref = _whole_array_metrics(got, want)
    monkeypatch.setattr(m, "CHUNK_ELEMENTS", 700)  # 2 rows per chunk: the chunk seams are exercised
    ours = m.metrics(got, want, logits=True)
    for k, v in ref.items():
        assert np.isclose(ours[k], v, rtol=1e-12, atol=0), (k, ours[k], v)
    assert ours["max_abs"] == ref["max_abs"] and ours["cosine"] == ref["cosine"]  # exact, not just close


def test_hand_computed_small_case():
    want = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.0, 0.0, 0.0, 0.0, 0.0, -2.0]], np.float32)
    got = np.array([[1.0, 2.0, 3.0, 4.0, 5.5, 6.0], [0.0, 0.0, 0.0, 0.0, 0.0, -1.0]], np.float32)
    out = metrics(got, want, logits=True)
    assert out["max_abs"] == 1.0
    assert out["max_rel"] == 1.0 / 6.0
    assert np.isclose(out["mean_abs"], 1.5 / 12)
    cos0 = (91 + 2.5) / (np.sqrt(91) * np.sqrt(91 + 5.25 + 0.0))  # 1+4+9+16+27.5+36 / (|want| |got|)
    assert np.isclose(out["cosine"], min(cos0, 1.0)) and np.isclose(out["mean_cosine"], (cos0 + 1.0) / 2)
    # row 0: both top-1 = index 5; row 1: argmax of got = index 0 (first of five zeros), of want index 0 too
    assert out["top1"] == 1.0
    # row 0 top-5 both {1..5}; row 1 top-5 both the five zeros {0..4}
    assert out["top5"] == 1.0


def test_top_k_ties_go_to_the_lower_index_and_a_miss_counts():
    from vlmforge.validators.metrics import topk_indices, topk_overlap

    x = np.array([[3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    assert sorted(topk_indices(x, 5)[0].tolist()) == [0, 1, 2, 3, 4]
    y = np.array([[0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0]])  # top-5 {3..7}; x's {0..4}: overlap {3, 4}
    assert topk_overlap(x, y, 5).tolist() == [2 / 5]
    assert topk_overlap(x, x, 5).tolist() == [1.0]
    assert sorted(topk_indices(np.array([[2.0, 1.0]]), 5)[0].tolist()) == [0, 1]  # fewer columns than k: all of them
    out = metrics(np.array([[0.0, 1.0, 2.0]]), np.array([[2.0, 1.0, 0.0]]), logits=True)
    assert out["top1"] == 0.0 and out["top5"] == 1.0  # k clipped to 3 columns: the same set


def test_zero_rows_cosine():
    z = np.zeros((1, 4), np.float32)
    v = np.ones((1, 4), np.float32)
    assert metrics(z, z)["cosine"] == 1.0  # both zero: identical
    assert metrics(z, v)["cosine"] == 0.0  # a zero output matches nothing (it scored 1.0 before)
    assert metrics(v, z)["cosine"] == 0.0
    assert metrics(-v, v)["cosine"] == -1.0
    both_zero = metrics(z, z, logits=True)
    assert both_zero["max_rel"] == 0.0 and both_zero["top1"] == 1.0


def test_shape_mismatch_and_nan_fail_every_gate():
    bad = metrics(np.zeros((2, 3)), np.zeros((3, 2)), logits=True)
    assert bad["max_abs"] == float("inf") and bad["cosine"] == -1.0 and bad["top1"] == 0.0
    nan = np.array([[np.nan, 1.0]])
    checks = compare("decoder", "nan", nan, np.array([[1.0, 1.0]]), {"max_rel": 1.0, "cosine": 0.0})
    assert not any(c.passed for c in checks)


def test_large_logits_use_bounded_memory():
    """Chunks are at most CHUNK_ELEMENTS values: a [64, 151936] pair never widens more than one chunk."""
    import vlmforge.validators.metrics as m

    assert m.CHUNK_ELEMENTS * 8 <= 64 << 20
    rng = np.random.default_rng(2)
    want = rng.standard_normal((64, 151936), dtype=np.float32)
    out = metrics(want, want, logits=True)
    assert out["max_abs"] == 0.0 and out["top1"] == 1.0 and out["top5"] == 1.0 and np.isclose(out["cosine"], 1.0)
