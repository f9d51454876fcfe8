"""The decoder (exporters.layered_decoder) and the vision towers (exporters.layered.blockwise_model) assembled from
one traced piece per kind of layer are the whole trace's graph:
same inputs and outputs, same parameter initializers, and the same outputs bit for bit in onnxruntime, on both
families' fixtures (Qwen2.5-VL: untied head; Qwen3-VL: tied head and two DeepStack layers)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vlmforge.exporters import decoder as D
from vlmforge.exporters.layered import NotLayered, signature
from vlmforge.exporters.layered_decoder import layered_model
from vlmforge.exporters.onnx_export import export_module


def _fixture(family: str):
    if family == "qwen2_5_vl":
        from vlmforge.families.qwen2_5_vl.fixture import build_model

        model = build_model()
        return model, 0
    from vlmforge.families.qwen3_vl.fixture import build_model

    model = build_model()
    return model, len(model.config.vision_config.deepstack_visual_indexes)


def _export(model, ds: int, path, trace):
    tc = model.config.text_config
    contract = D.decoder_contract(tc, ds)
    with D.grouped_attention_on(tc):
        export_module(D.DecoderForExport(model.model.language_model, model.lm_head, ds), D.example_inputs(tc, ds),
                      path, input_names=contract.input_names, output_names=contract.output_names,
                      dynamic_shapes=D.dynamic_shapes(tc, ds), stage="test/decoder", contract=contract, trace=trace)
    return contract


def _feeds(tc, ds: int, b=3, s=4, past=6) -> dict:
    d = D.decoder_dims(tc)
    rng = np.random.default_rng(1)
    mask = np.ones((b, past + s), np.int64)
    mask[1, :3] = 0  # a left-padded row
    pos = np.broadcast_to(np.arange(past, past + s, dtype=np.int64), (3, b, s)).copy()
    pos[1] += 2  # MRoPE: the three sections differ
    feeds = {"inputs_embeds": rng.standard_normal((b, s, d["hidden"]), np.float32), "attention_mask": mask,
             "position_ids": pos}
    if ds:
        feeds["deepstack_embeds"] = rng.standard_normal((ds, b, s, d["hidden"]), np.float32)
    for i in range(d["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((b, d["kv_heads"], past, d["head_dim"]),
                                                                      np.float32)
    return feeds


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_layered_decoder_is_the_whole_trace(tmp_path, caplog, family):
    import logging

    model, ds = _fixture(family)
    whole = tmp_path / "whole" / "decoder.onnx"
    layered = tmp_path / "layered" / "decoder.onnx"
    contract = _export(model, ds, whole, None)
    with caplog.at_level(logging.DEBUG, logger="vlmforge"):
        _export(model, ds, layered, layered_model)
    assert "traced whole" not in caplog.text and "layered trace: layer 0" in caplog.text  # really assembled

    a, b = onnx.load(whole, load_external_data=False), onnx.load(layered, load_external_data=False)
    assert [i.name for i in b.graph.input] == list(contract.input_names) == [i.name for i in a.graph.input]
    assert [o.name for o in b.graph.output] == list(contract.output_names)
    params = {n for n, _ in model.named_parameters()}  # as the decoder module names them, `lm.layers.{i}...`
    named = lambda m: {i.name for i in m.graph.initializer if i.name.startswith(("lm.", "lm_head."))}
    assert named(b) == named(a)
    assert any(n.startswith("lm.layers.2.") for n in named(b)), "every layer has its own weights"
    assert len(params) > 0

    feeds = _feeds(model.config.text_config, ds)
    out_a = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"]).run(None, feeds)
    out_b = ort.InferenceSession(str(layered), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(out_a) == len(out_b) == len(contract.output_names)
    for name, x, y in zip(contract.output_names, out_a, out_b):
        assert x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)

    # ... and both are the PyTorch model's decoder.
    tc = model.config.text_config
    with torch.no_grad(), D.grouped_attention_on(tc):
        ref = D.DecoderForExport(model.model.language_model, model.lm_head, ds).eval()(
            *[torch.from_numpy(v) for v in feeds.values()])
    np.testing.assert_allclose(out_b[0], ref[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out_b[-1], ref[-1].numpy(), rtol=1e-4, atol=1e-4)


def test_layers_of_another_kind_are_traced_on_their_own():
    model, _ = _fixture("qwen2_5_vl")
    layers = model.model.language_model.layers
    assert signature(layers[0]) == signature(layers[1])  # only layer_idx differs
    layers[1].self_attn.sliding_window = 64
    assert signature(layers[0]) != signature(layers[1])
    assert signature(layers[0]) == signature(layers[2])


def test_a_decoder_that_cannot_be_assembled_says_so():
    model, _ = _fixture("qwen2_5_vl")
    tc = model.config.text_config
    contract = D.decoder_contract(tc)
    args = D.example_inputs(tc)[:-2]  # one layer's past missing
    with pytest.raises(NotLayered, match="past inputs"):
        layered_model(D.DecoderForExport(model.model.language_model, model.lm_head), args, contract.input_names,
                      contract.output_names, 18)


# -- vision towers: blockwise_model ------------------------------------------------------------------------------
def _vision_export(family: str, model, size, deepstack: bool, path, trace):
    from vlmforge.families.qwen2_5_vl import vision as V25
    from vlmforge.families.qwen3_vl import vision as V3

    if family == "qwen2_5_vl":
        module, contract, args = V25.build_vision_module(model, size), V25.vision_contract(model.config, size), \
            V25.example_inputs(model.config, size)
    else:
        module, contract = V3.build_vision_module(model, size, deepstack), V3.vision_contract(model.config, size, deepstack)
        args = V3.example_inputs(model.config, size)
    export_module(module, args, path, input_names=contract.input_names, output_names=contract.output_names,
                  stage="test/vision", contract=contract, trace=trace)
    return module, contract, args


@pytest.mark.parametrize(("family", "size", "deepstack"), [
    ("qwen2_5_vl", 392, False),  # edge windows smaller than the others: gathered, masked
    ("qwen2_5_vl", 448, False),  # every window full: a reshape
    ("qwen3_vl", 384, True),  # two DeepStack blocks, each with its merger
    ("qwen3_vl", 384, False),
])
def test_blockwise_vision_is_the_whole_trace(tmp_path, caplog, family, size, deepstack):
    import logging

    from vlmforge.exporters.layered import blockwise_model

    model, _ = _fixture(family)
    whole, blocks = tmp_path / "whole" / "vision.onnx", tmp_path / "blocks" / "vision.onnx"
    module, contract, args = _vision_export(family, model, size, deepstack, whole, None)
    with caplog.at_level(logging.DEBUG, logger="vlmforge"):
        _vision_export(family, model, size, deepstack, blocks, blockwise_model)
    assert "traced whole" not in caplog.text and "layered trace: block 0" in caplog.text  # really assembled
    head, steps, tail = module.pieces()
    kinds = {signature(s) for s in steps}
    # full/windowed (or DeepStack/plain) blocks: a kind each, traced once
    assert len(kinds) == (1 if family == "qwen3_vl" and not deepstack else 2) < len(steps)

    a, b = onnx.load(whole, load_external_data=False), onnx.load(blocks, load_external_data=False)
    assert [i.name for i in b.graph.input] == [i.name for i in a.graph.input] == list(contract.input_names)
    assert [o.name for o in b.graph.output] == [o.name for o in a.graph.output] == list(contract.output_names)
    params = {n for n, _ in module.named_parameters()}
    named = lambda m: {i.name for i in m.graph.initializer if i.name in params}
    assert named(b) == named(a) and any(n.startswith(f"blocks.{len(steps) - 1}.") for n in named(b))

    rng = np.random.default_rng(3)
    feeds = {"pixel_values": rng.standard_normal(tuple(args[0].shape)).astype(np.float32),
             "image_grid_thw": args[1].numpy()}
    out_a = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"]).run(None, feeds)
    out_b = ort.InferenceSession(str(blocks), providers=["CPUExecutionProvider"]).run(None, feeds)
    for name, x, y in zip(contract.output_names, out_a, out_b):
        np.testing.assert_array_equal(x, y, err_msg=name)
    with torch.no_grad():  # ... and both are the module's forward
        ref = module(torch.from_numpy(feeds["pixel_values"]), args[1])
    ref = ref if isinstance(ref, tuple) else (ref,)
    for name, x, y in zip(contract.output_names, ref, out_b):
        np.testing.assert_allclose(y, x.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
