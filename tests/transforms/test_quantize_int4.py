"""quantize_int4 on a small hand-made graph: the INT4 graph computes exactly the FP32 graph with the
dequantized weights (dequantized here in numpy from the packed nibbles, the block scales and zero points),
so wrong scales, a wrong nibble order or a wrong block layout fail; and what is left float, and why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests._onnx_graphs import init, model, run, save, value
from vlmforge.config import Int4Config
from vlmforge.core.errors import RecipeError
from vlmforge.transforms.quantize_int4 import check_int4_config, quantize_int4

K, N, BLOCK = 64, 16, 32


def _graph(w: np.ndarray, w2: np.ndarray | None = None) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits, outputs = [init("w", w)], [value("y", [2, w.shape[1]])]
    if w2 is not None:  # a second MatMul on y
        nodes.append(helper.make_node("MatMul", ["y", "w2"], ["z"], name="mm2"))
        inits.append(init("w2", w2))
        outputs.append(value("z", [2, w2.shape[1]]))
    return model(nodes, [value("x", [2, w.shape[0]])], outputs, inits)


def dequantize(q: onnx.ModelProto, weight: str, scale_factor: float = 1.0) -> np.ndarray:
    """[K, N] float weights of the MatMulNBits node that quantized `weight`: B is [N, blocks, BLOCK/2] uint8
    (element 2i in the low nibble), scales [N, blocks], zero points [N, ceil(blocks/2)] 4-bit packed the same
    way (8 when absent: symmetric)."""
    node = next(n for n in q.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(weight + "_"))
    arrays = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    packed = arrays[node.input[1]]
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1, block).astype(np.float32)
    blocks = nibbles.shape[1]
    scales = arrays[node.input[2]].reshape(n, blocks).astype(np.float32) * scale_factor
    if len(node.input) > 3:
        zp = arrays[node.input[3]].reshape(n, -1)
        zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zp = np.full((n, blocks), 8.0, np.float32)
    w = (nibbles - zp[:, :, None]) * scales[:, :, None]  # [N, blocks, BLOCK]
    return w.reshape(n, -1)[:, :k].T.copy()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_graph_equals_fp32_graph_with_dequantized_weights(tmp_path, symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    src = save(_graph(w), tmp_path / "m.onnx")
    record = quantize_int4(src, tmp_path / "q.onnx", Int4Config(block_size=BLOCK, symmetric=symmetric, accuracy_level=0))
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits"] and record["quantized_nodes"] == 1
    deq = dequantize(q, "w")
    assert 0 < np.abs(deq - w).max() <= np.abs(w).max() / 7 + 1e-6  # really quantized, at 4-bit resolution
    x = rng.standard_normal((2, K)).astype(np.float32)
    got = run(tmp_path / "q.onnx", {"x": x})["y"]
    ref = run(save(_graph(deq), tmp_path / "deq.onnx"), {"x": x})["y"]
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5), np.abs(got - ref).max()
    wrong = run(save(_graph(dequantize(q, "w", scale_factor=1.02)), tmp_path / "wrong.onnx"), {"x": x})["y"]
    assert not np.allclose(got, wrong, rtol=1e-5, atol=1e-5)  # scales 2% off: the comparison sees it
    assert record["symmetric"] is symmetric and record["block_size"] == BLOCK and record["kept_float"] == {}


def test_weights_the_quantizer_cannot_take_stay_float_and_are_listed(tmp_path):
    """An input dimension that is not a multiple of the block (48 % 32), and the LM head (N == vocab) when
    quantize_lm_head is off, stay MatMul with their FP32 weights, each with the reason in the record."""
    rng = np.random.default_rng(1)
    w, w2 = rng.standard_normal((K, 48)).astype(np.float32), rng.standard_normal((48, 8)).astype(np.float32)
    src = save(_graph(w, w2), tmp_path / "m.onnx")
    record = quantize_int4(src, tmp_path / "q.onnx", Int4Config(block_size=BLOCK, accuracy_level=0))
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert sorted(n.op_type for n in q.graph.node) == ["MatMul", "MatMulNBits"]
    assert record["kept_float"] == {"mm2": "input dim 48 is not a multiple of block size 32"}
    kept = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert np.array_equal(kept["w2"], w2)
    record = quantize_int4(src, tmp_path / "q2.onnx", Int4Config(block_size=BLOCK, accuracy_level=0), vocab=48)
    assert record["kept_float"] == {"mm": "lm_head kept float (precision.int4.quantize_lm_head=false)",
                                    "mm2": "input dim 48 is not a multiple of block size 32"}
    assert record["quantized_nodes"] == 0


def test_accuracy_level_is_set_on_every_node(tmp_path):
    w = np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)
    src = save(_graph(w), tmp_path / "m.onnx")
    quantize_int4(src, tmp_path / "q.onnx", Int4Config(block_size=BLOCK, accuracy_level=4))
    node = onnx.load(str(tmp_path / "q.onnx")).graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == 4


@pytest.mark.parametrize("change, words", [
    ({"algorithm": "gptq"}, "algorithm"), ({"block_size": 48}, "block_size=48"),
    ({"accuracy_level": 5}, "accuracy_level=5"), ({"algorithm": "hqq", "symmetric": True}, "asymmetric"),
])
def test_unsupported_int4_settings_are_recipe_errors(change, words):
    with pytest.raises(RecipeError, match=words) as err:
        check_int4_config(Int4Config(**change), "recipes/precision/int4.yaml")
    assert err.value.where == "recipes/precision/int4.yaml" and err.value.fix
