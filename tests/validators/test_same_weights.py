"""The INT4 graph check on random weights: a correct INT4 graph agrees tightly with PyTorch running its
dequantized weights; one whose scales are permuted fails (quantization noise alone could not tell)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vlmforge.runtime.engine import make_session
from vlmforge.transforms.quantize_int4 import quantize_int4
from vlmforge.validators.metrics import metrics
from vlmforge.validators.same_weights import dequantize_matmul_nbits, load_into

INT4 = SimpleNamespace(algorithm="default", block_size=32, symmetric=True, accuracy_level=4, quantize_lm_head=True,
                       quantize_embedding=False)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.ReLU(), torch.nn.Linear(128, 64, bias=False))


def _export(model: torch.nn.Module, path) -> None:
    """The MLP as the exporter writes linears: MatMul with a [K, N] initializer (W^T), anonymous names."""
    w1, w2 = (m.weight.detach().T.contiguous().numpy() for m in (model[0], model[2]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "val_1"], ["h"], name="node_linear"),
         helper.make_node("Relu", ["h"], ["r"], name="node_relu"),
         helper.make_node("MatMul", ["r", "val_2"], ["y"], name="node_linear_1")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(w1, "val_1"), numpy_helper.from_array(w2, "val_2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                               ir_version=8),
              str(path))


@pytest.fixture()
def graphs(tmp_path):
    model = _mlp()
    _export(model, tmp_path / "fp32.onnx")
    (tmp_path / "q").mkdir()
    record = quantize_int4(tmp_path / "fp32.onnx", tmp_path / "q" / "int4.onnx", INT4)
    return record["source_weights"], tmp_path / "q" / "int4.onnx"


def _graph_vs_torch(sources, int4):
    model = _mlp()
    replaced, unmatched, steps = load_into(model, int4, sources)
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    got = make_session(int4).run(None, {"x": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
        fp32_out = _mlp()(torch.from_numpy(x)).numpy()
    return replaced, unmatched, steps, metrics(got, want), metrics(got, fp32_out)


def test_int4_graph_agrees_with_pytorch_on_its_own_weights(graphs):
    replaced, unmatched, steps, same, vs_fp32 = _graph_vs_torch(*graphs)
    assert (replaced, unmatched) == (2, [])
    assert steps <= 1.001  # round to nearest: within one quantization step
    assert same["cosine"] >= 0.999 and same["max_rel"] < 0.05  # what the recipe gates (cosine 0.99, max_rel 0.1)
    assert same["max_abs"] < vs_fp32["max_abs"] / 3  # far tighter than the comparison with the FP32 weights


def test_int4_graph_with_permuted_scales_fails_the_weight_check(graphs):
    sources, int4 = graphs
    m = onnx.load(str(int4))
    scales = next(t for t in m.graph.initializer if t.name.endswith("_scales"))
    arr = numpy_helper.to_array(scales).copy()
    arr = arr.reshape(arr.shape[0], -1)[np.random.default_rng(0).permutation(arr.shape[0])].reshape(arr.shape)
    scales.CopyFrom(numpy_helper.from_array(arr, scales.name))
    onnx.save(m, str(int4))
    _, unmatched, steps, same, _ = _graph_vs_torch(sources, int4)
    assert unmatched == []
    assert steps > 1.5  # the gate is 1.001: the build fails


def test_int4_weight_not_from_the_model_is_reported_unmatched(graphs):
    sources, int4 = graphs
    other = _mlp(seed=7)  # the same shapes, other weights: nothing matches
    replaced, unmatched, _ = load_into(other, int4, sources)
    assert replaced == 0 and sorted(unmatched) == ["val_1", "val_2"]


def test_dequantize_matmul_nbits_reads_low_nibble_first_with_zero_point_8():
    b = np.array([[[0x21] + [0x88] * 15]], np.uint8)  # N=1, one block of 32: q[0]=1, q[1]=2, the rest 8
    w, step = dequantize_matmul_nbits(b, np.array([0.5], np.float32), None, k=32, n=1, block=32)
    assert w.shape == (1, 32) and w[0, 0] == -3.5 and w[0, 1] == -3.0 and not w[0, 2:].any()
    assert (step == 0.5).all()


def test_dequantize_with_zero_points_and_a_padded_last_block_matches_the_kernel_formula():
    """MatMulNBits: w[n, k] = (nibble - zero point of its block) x scale of its block, low nibble first, the zero
    points packed two per byte, K padded up to whole blocks (K=40 with blocks of 16: the last block half used)."""
    from vlmforge.validators.same_weights import QuantizedLinear

    n, k, block = 5, 40, 16
    blocks = 3
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, (n, blocks * block), dtype=np.uint8)
    zp = rng.integers(0, 16, (n, blocks), dtype=np.uint8)
    scales = rng.random((n, blocks), dtype=np.float32) + 0.1
    b = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, blocks, block // 2)
    zpp = np.zeros((n, 2), np.uint8)  # ceil(3 / 2) bytes a row
    zpp[:, 0] = zp[:, 0] | (zp[:, 1] << 4)
    zpp[:, 1] = zp[:, 2]
    want = ((q.astype(np.float32).reshape(n, blocks, block) - zp[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]
    packed = QuantizedLinear(b, scales.reshape(-1), zpp.reshape(-1), k, n, block)
    out = np.full((n, k), np.nan, np.float32)
    assert packed.dequantize(out) is out and np.array_equal(out, want)
    w, step = packed.rows(1, 4)
    assert np.array_equal(w, want[1:4]) and np.array_equal(step, np.repeat(scales[1:4], block, 1)[:, :k])


def test_dequantizing_a_vocab_sized_head_holds_one_float_copy(monkeypatch):
    """The check of an lm_head [151936, 2048] (1.2 GB as float32) once held ~10x that in temporaries (float
    copies, float64 step ratios): the INT4 build's peak. Block by block, only the result is held whole."""
    import tracemalloc

    from vlmforge.validators import same_weights

    n, k, block = 8192, 256, 32
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32)
    scales = (np.abs(w).reshape(n, k // block, block).max(-1) / 7).astype(np.float32)
    q = np.clip(np.rint(w.reshape(n, k // block, block) / scales[..., None]) + 8, 0, 15).astype(np.uint8).reshape(n, k)
    b = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, k // block, block // 2)
    packed = same_weights.QuantizedLinear(b, scales.reshape(-1), None, k, n, block)
    original = np.ascontiguousarray(w.T)  # the FP32 graph's [K, N] initializer
    monkeypatch.setattr(same_weights, "CHUNK_BYTES", 1 << 18)  # a block's temporaries are ~8x this
    tracemalloc.start()
    try:
        weight, steps = same_weights.dequantize_checked(packed, original)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    full, full_step = dequantize_matmul_nbits(b, scales.reshape(-1), None, k=k, n=n, block=block)
    assert np.array_equal(weight, full) and steps <= 0.5001  # the same weights, within half a step
    assert steps == float((np.abs(full - w) / full_step).max())
    assert peak < 1.5 * w.nbytes, f"peak {peak / w.nbytes:.2f}x the weight's float32 bytes"


def test_random_weights_select_the_quality_sanity_bound_and_nothing_else():
    """validate.weights=random: a transformed graph's quality gate is its `<precision>_random` entry (INT4 against
    FP32 on random weights measures only noise); graph checks and FP32 gates are the same on any weights."""
    from tests.conftest import compose
    from vlmforge.validators.suite import tolerance

    tol = compose("precision=int4_mixed").validate.tolerances
    assert tolerance(tol, "decoder", "int4", "random") == {"mean_cosine": 0.4} != tolerance(tol, "decoder", "int4")
    assert tolerance(tol, "chain", "int4", "random") == {"mean_cosine": 0.4}
    for stage, precision in (("decoder", "fp32"), ("decoder", "int4_weights"), ("vision", "fp16"), ("chain", "fp32")):
        assert tolerance(tol, stage, precision, "random") == tolerance(tol, stage, precision)
