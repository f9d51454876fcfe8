"""cast_fp16 on a small hand-made graph: the FP16 graph's outputs are the FP32 graph's within FP16
rounding, the weights really are FP16, the sensitive ops (RMSNorm's Pow/ReduceMean/Sqrt/Div, Softmax) stay
FP32 (x^2 above 256 would overflow FP16), and the external-data path streams and casts the same bytes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from tests._onnx_graphs import rmsnorm_mlp, run, save
from vlmforge.core.errors import ArtifactError
from vlmforge.transforms.cast_fp16 import cast_fp16
from vlmforge.transforms.external import external_file, external_tensors, fp16_clamped, load_structure, stream_external

K, N = 16, 8


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((K, N)).astype(np.float32) * 0.3, rng.standard_normal(N).astype(np.float32) * 0.1


def _fp16_rounding_bound(ref: np.ndarray) -> float:
    return 4e-3 * max(1.0, float(np.abs(ref).max()))  # a few FP16 ulps (2^-10 ~ 1e-3) at the output's scale


def test_fp16_graph_matches_fp32_within_fp16_rounding(tmp_path, weights):
    src = save(rmsnorm_mlp(*weights), tmp_path / "m.onnx")
    record = cast_fp16(src, tmp_path / "m16.onnx")
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    want, got = run(src, {"x": x}), run(tmp_path / "m16.onnx", {"x": x})
    for name in ("y", "h", "p"):
        assert got[name].dtype == np.float32  # keep_io_types: FP32 I/O by default
        err = float(np.abs(got[name] - want[name]).max())
        assert err <= _fp16_rounding_bound(want[name]), (name, err)
    assert np.abs(got["y"] - want["y"]).max() > 0  # the weights really went through FP16
    out = onnx.load(str(tmp_path / "m16.onnx"))
    dtypes = {t.name: t.data_type for t in out.graph.initializer}
    assert dtypes["w"] == TensorProto.FLOAT16 and dtypes["b"] == TensorProto.FLOAT16
    w16 = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w"))
    assert np.array_equal(w16, weights[0].astype(np.float16))
    assert record["transform"] == "cast_fp16" and record["io"] == "float32"
    assert record["fp32_op_types_present"] == ["Div", "Pow", "ReduceMean", "Softmax", "Sqrt"]


def test_blocked_ops_stay_fp32_so_large_activations_do_not_overflow(tmp_path, weights):
    """y ~ 300: y^2 = 9e4 > 65504 overflows FP16. The RMSNorm chain (Pow, ReduceMean, the eps Add, Sqrt, Div)
    must run in FP32, so h stays finite and equals the FP32 graph's; cast, h is 0 (y / inf)."""
    w, _ = weights
    src = save(rmsnorm_mlp(w, np.full(N, 300.0, np.float32)), tmp_path / "m.onnx")
    cast_fp16(src, tmp_path / "m16.onnx")
    x = np.random.default_rng(2).standard_normal((2, K)).astype(np.float32)
    want, got = run(src, {"x": x}), run(tmp_path / "m16.onnx", {"x": x})
    assert np.isfinite(got["h"]).all() and np.isfinite(got["p"]).all()
    assert np.abs(got["h"] - want["h"]).max() <= _fp16_rounding_bound(want["h"])


def test_fp16_io_makes_the_graph_io_fp16(tmp_path, weights):
    src = save(rmsnorm_mlp(*weights), tmp_path / "m.onnx")
    record = cast_fp16(src, tmp_path / "m16.onnx", fp16_io=True)
    out = onnx.load(str(tmp_path / "m16.onnx"))
    assert record["io"] == "float16"
    assert {v.type.tensor_type.elem_type for v in (*out.graph.input, *out.graph.output)} == {TensorProto.FLOAT16}
    x = np.random.default_rng(3).standard_normal((2, K)).astype(np.float32)
    got = run(tmp_path / "m16.onnx", {"x": x.astype(np.float16)})
    assert np.abs(got["y"].astype(np.float32) - run(src, {"x": x})["y"]).max() < 2e-2


def test_external_data_is_streamed_and_cast_like_the_in_memory_path(tmp_path, weights):
    """Weights in `m.onnx.data`: the FP16 graph points into its own `<dst>.data`, which holds the FP16 bytes
    of every weight, and it computes exactly what the in-memory conversion computes."""
    inline = save(rmsnorm_mlp(*weights), tmp_path / "inline.onnx")
    (tmp_path / "ext").mkdir()
    ext = save(rmsnorm_mlp(*weights), tmp_path / "ext" / "m.onnx", external=True)
    assert external_tensors(load_structure(ext))  # the source really uses external data
    cast_fp16(inline, tmp_path / "inline16.onnx")
    dst = tmp_path / "ext" / "m16.onnx"
    cast_fp16(ext, dst)
    structure = load_structure(dst)
    refs = {t.name: external_file(dst, t) for t in external_tensors(structure)}
    assert {"w", "b"} <= set(refs) and all(f == dst.with_name("m16.onnx.data") for f, _, _ in refs.values())
    data = dst.with_name("m16.onnx.data").read_bytes()
    _, off, length = refs["w"]
    assert data[off:off + length] == weights[0].astype(np.float16).tobytes()
    x = np.random.default_rng(4).standard_normal((2, K)).astype(np.float32)
    a, b = run(tmp_path / "inline16.onnx", {"x": x}), run(dst, {"x": x})
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_stream_external_aligns_large_tensors_and_refuses_damaged_data(tmp_path):
    """A tensor of 1 MiB or more starts on a 4096-byte boundary; a truncated source is an ArtifactError."""
    from tests._onnx_graphs import init, model, value
    from onnx import helper

    big = (np.arange(1 << 18, dtype=np.float32) % 997 / 7).reshape(1, -1)  # 1 MiB
    small = np.arange(16, dtype=np.float32)
    m = model([helper.make_node("Identity", ["a"], ["ya"]), helper.make_node("Identity", ["s"], ["ys"])], [],
              [value("ya", big.shape), value("ys", small.shape)], [init("s", small), init("a", big)])
    src = save(m, tmp_path / "src.onnx", external=True)
    structure = load_structure(src)
    written = stream_external(structure, src, tmp_path / "dst.onnx", {"a"})
    refs = {t.name: (int(dict((e.key, e.value) for e in t.external_data)["offset"]),
                     int(dict((e.key, e.value) for e in t.external_data)["length"])) for t in external_tensors(structure)}
    assert refs["a"][0] % 4096 == 0 and refs["a"][1] == big.size * 2  # cast to FP16 on the way
    assert refs["s"][1] == small.nbytes  # not named: copied as FP32
    data = (tmp_path / "dst.onnx.data").read_bytes()
    assert written == len(data)
    assert np.array_equal(np.frombuffer(data[refs["a"][0]:refs["a"][0] + refs["a"][1]], np.float16), big.ravel().astype(np.float16))
    assert np.array_equal(np.frombuffer(data[refs["s"][0]:refs["s"][0] + refs["s"][1]], np.float32), small)
    raw = (tmp_path / "src.onnx.data").read_bytes()
    (tmp_path / "src.onnx.data").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ArtifactError, match="truncated"):
        stream_external(load_structure(src), src, tmp_path / "dst2.onnx", {"a"})


def test_fp16_clamped_gives_the_converters_bits():
    """The streamed cast is the FP16 converter's own clamping, bit for bit: at every edge (0, -0, NaN, +-inf,
    below the smallest subnormal, between 65504 and the FP16 overflow, the FP32 extremes) and on values over
    30 decades."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    f32 = np.finfo(np.float32)
    edge = np.array([0, -0.0, np.nan, np.inf, -np.inf, 1e-9, -1e-9, 5.96e-8, -5.96e-8, 5.9e-8, 6e-8, 2.9e-8, 3e-8,
                     1e-45, -1e-45, f32.tiny, 65504, 65505, 65519, 65520, -65504.5, 1e6, -1e6, f32.max, -f32.max,
                     1.0, -2.5], np.float32)
    rng = np.random.default_rng(1)
    wide = (rng.standard_normal(1 << 16) * 10.0 ** rng.integers(-15, 15, 1 << 16)).astype(np.float32)
    for a in (edge, wide, wide.reshape(256, 256)):
        got, want = fp16_clamped(a), convert_np_to_float16(a)
        assert got.dtype == np.float16 and got.shape == a.shape
        assert np.array_equal(got.view(np.uint16), np.asarray(want, np.float16).view(np.uint16))
    assert fp16_clamped(np.array([1e-9, -1e6], np.float32)).tolist() == [np.float16(5.96e-8), -65504.0]
