"""cast_fp16 on the tiny fixtures' exported decoders at activations real checkpoints have: hidden states with
rms > 256, whose squares (mean above 65504) overflow FP16. The RMSNorm chains stay FP32 as one region, so
the FP16 decoder's logits still follow the FP32 decoder's. Before the regions were joined, every norm's
x^2 went through an FP16 Cast: mean(x^2) = inf, the normalised output 0 and the logits constant (cosine 0).
The rotary path likewise: its positions went through FP16 (exact only up to 2048), so far positions got
wrong angles (cosine 0.69 / 0.89 at position 30000)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from vlmforge.transforms.cast_fp16 import cast_fp16

SEQ = 12


def _feeds(session: ort.InferenceSession, scale: float, start: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "inputs_embeds":
            feeds[i.name] = (rng.standard_normal((1, SEQ, i.shape[-1])) * scale).astype(np.float32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, SEQ), np.int64)
        elif i.name == "position_ids":
            lead = [i.shape[0]] if len(i.shape) == 3 else []
            feeds[i.name] = np.broadcast_to(np.arange(start, start + SEQ, dtype=np.int64), (*lead, 1, SEQ)).copy()
        elif i.name == "deepstack_embeds":  # [levels, batch, seq, hidden], added to the first layers' states
            feeds[i.name] = (rng.standard_normal((i.shape[0], 1, SEQ, i.shape[-1])) * scale).astype(np.float32)
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        else:
            raise AssertionError(f"the test does not know the decoder input {i.name}")
    return feeds


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("fixture", ["qwen25_392", "qwen3_384"])
def test_fp16_decoder_logits_follow_fp32_when_rms_exceeds_256(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture).directory / "decoder.onnx"
    record = cast_fp16(src, tmp_path / "decoder.onnx")
    layers = sum(1 for i in onnx.load(str(src), load_external_data=False).graph.input if i.name.endswith(".key"))
    assert record["fp32_norm_nodes"] >= 7 * (2 * layers + 1)  # every RMSNorm found: 2 per layer + the final one
    s32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for scale in (300.0, 3000.0):
        feeds = _feeds(s32, scale)
        assert np.sqrt((feeds["inputs_embeds"] ** 2).mean()) > 256
        want, got = s32.run(["logits"], feeds)[0], s16.run(["logits"], feeds)[0]
        assert np.isfinite(got).all(), scale
        assert _cosine(got, want) >= 0.99, (scale, _cosine(got, want))
        assert float(np.std(got)) > 0.5 * float(np.std(want)), scale  # not collapsed to near-constant logits


@pytest.mark.parametrize("fixture", ["qwen25_392", "qwen3_384"])
def test_fp16_decoder_logits_follow_fp32_at_positions_beyond_fp16_integers(fixture, request, tmp_path):
    """Positions 30000.. are not FP16 integers (spacing 16 there): the rotary path must stay FP32 to Cos/Sin."""
    src = request.getfixturevalue(fixture).directory / "decoder.onnx"
    cast_fp16(src, tmp_path / "decoder.onnx")
    s32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(s32, 1.0, start=30000)
    want, got = s32.run(["logits"], feeds)[0], s16.run(["logits"], feeds)[0]
    assert _cosine(got, want) >= 0.99, _cosine(got, want)
