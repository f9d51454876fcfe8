"""core.hashing.array_fingerprint: how an INT4 transform names the FP32 weight it quantized and the validation finds
it in the PyTorch model again."""

from __future__ import annotations

import numpy as np

from vlmforge.core.hashing import FINGERPRINT_GRID, array_fingerprint


def test_same_values_same_fingerprint_whatever_the_layout():
    w = np.random.default_rng(0).standard_normal((600, 300)).astype(np.float32)
    t = np.ascontiguousarray(w.T)
    assert array_fingerprint(w.T) == array_fingerprint(t)  # a transposed view, as the validation reads a Linear
    assert array_fingerprint(w) != array_fingerprint(t)
    assert array_fingerprint(w.astype(np.float64)) == array_fingerprint(w)  # float32 values, not the storage


def test_small_matrices_are_read_whole_and_shape_counts():
    w = np.random.default_rng(1).standard_normal((FINGERPRINT_GRID, 40)).astype(np.float32)
    base = array_fingerprint(w)
    for i, j in ((0, 0), (77, 13), (FINGERPRINT_GRID - 1, 39)):
        v = w.copy()
        v[i, j] = np.nextafter(v[i, j], np.float32(np.inf))  # one ulp anywhere
        assert array_fingerprint(v) != base
    assert array_fingerprint(w.reshape(40, FINGERPRINT_GRID)) != base  # same values, other shape
    assert array_fingerprint(np.zeros(0, np.float32)) != array_fingerprint(np.zeros((0, 3), np.float32))


def test_large_matrices_sample_both_ends_and_spread_rows():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((2048, 1100)).astype(np.float32)
    base = array_fingerprint(w)
    for i, j in ((0, 0), (2047, 1099), (0, 1099), (2047, 0)):
        v = w.copy()
        v[i, j] += 1
        assert array_fingerprint(v) != base
    others = {array_fingerprint(rng.standard_normal((2048, 1100)).astype(np.float32)) for _ in range(3)}
    assert base not in others and len(others) == 3
