"""The graph pass's sessions: in the chain, the vision graph is never open beside the embedding and decoder
(a full-depth 3B's FP32 vision graph, 2.5 GiB, next to the 12 GB decoder was its build's peak)."""

from __future__ import annotations

import numpy as np

from vlmforge.artifact.manifest import read_manifest
from vlmforge.core.contracts import StageContract
from vlmforge.validators.graphs import staged_engine


def test_exclusive_vision_closes_the_other_sessions_and_gives_the_same_features(qwen25_392):
    d = qwen25_392.directory
    m = read_manifest(d)
    contracts = {s: StageContract.from_json(s, m["components"][s]) for s in ("vision", "embedding", "decoder")}
    patches, dim = contracts["vision"].input("pixel_values").shape
    pv = np.random.default_rng(0).standard_normal((patches, dim)).astype(np.float32)
    grid = np.array([m["components"]["vision"]["grid_thw"]], np.int64)
    ids = np.array([[1, 2, 3]], np.int64)

    plain = staged_engine(d, contracts)
    want, _ = plain.encode_image(pv, grid)
    assert set(plain._open) == {"vision"}
    plain.embed(ids, None, None)
    assert set(plain._open) == {"vision", "embedding"}  # not exclusive: sessions stay open
    plain.close()

    engine = staged_engine(d, contracts)
    engine.exclusive_vision = True
    engine.embed(ids, None, None)
    engine.decoder
    assert set(engine._open) == {"embedding", "decoder"}
    got, _ = engine.encode_image(pv, grid)
    assert set(engine._open) == {"vision"} and np.array_equal(got, want)
    engine.embed(ids, None, None)
    assert set(engine._open) == {"embedding"}
    engine.close()
    assert engine._open == {}
