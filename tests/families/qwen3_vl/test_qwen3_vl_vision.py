"""Qwen3-VL vision stage: dims, DeepStack-index checks, static-shape module and ONNX graph vs stock HF."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlmforge.core.errors import CheckpointError, RecipeError
from vlmforge.families.qwen3_vl import dims
from vlmforge.families.qwen3_vl import vision as V
from vlmforge.families.qwen3_vl.fixture import tiny_config


def _vcfg(**over):
    base = dict(
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, depth=4,
        deepstack_visual_indexes=[0, 2],
    )
    return SimpleNamespace(**{**base, **over})


# --- dims ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 384, 448, 672])
def test_check_image_size_accepts_multiples_of_32(size):
    dims.check_image_size(size)


def test_check_image_size_names_family_and_nearest_sizes_when_392():
    with pytest.raises(RecipeError) as info:
        dims.check_image_size(392, where="recipes/vision/392.yaml")
    err = info.value
    assert "Qwen3-VL" in err.what and "multiples of 32" in err.what and "392" in err.what
    assert err.where == "recipes/vision/392.yaml"
    assert err.fix.startswith("use 384 or 416")


@pytest.mark.parametrize("size", [0, -32, 383.0, "384", True])
def test_check_image_size_rejects_non_positive_or_non_int(size):
    with pytest.raises(RecipeError, match="positive integer"):
        dims.check_image_size(size)


@pytest.mark.parametrize(
    ("size", "grid", "patches", "tokens"), [(384, (1, 24, 24), 576, 144), (672, (1, 42, 42), 1764, 441)]
)
def test_dims_match_field_notes(size, grid, patches, tokens):
    for cfg in (_vcfg(), vars(_vcfg()), tiny_config().vision_config):
        assert dims.grid_thw(cfg, size) == grid
        assert dims.num_patches(cfg, size) == patches
        assert dims.tokens_per_image(cfg, size) == tokens
        assert dims.patch_dim(cfg) == 1536


def test_deepstack_layers_are_in_block_order():
    assert dims.deepstack_layers(_vcfg(deepstack_visual_indexes=[2, 0])) == [0, 2]
    assert dims.deepstack_layers(_vcfg(deepstack_visual_indexes=[])) == []


@pytest.mark.parametrize("indexes", [[0, 4], [-1, 2], [0, 0]])
def test_check_deepstack_indexes_raises_checkpoint_error_when_invalid(indexes):
    with pytest.raises(CheckpointError) as info:
        dims.check_deepstack_indexes(_vcfg(deepstack_visual_indexes=indexes), where="ckpt/config.json")
    assert str(indexes) in info.value.what
    assert info.value.where == "ckpt/config.json"
    if indexes != [0, 0]:
        assert "4 ViT blocks" in info.value.what


def test_check_deepstack_indexes_accepts_tiny_and_full_range():
    dims.check_deepstack_indexes(tiny_config().vision_config)
    dims.check_deepstack_indexes({"depth": 4, "deepstack_visual_indexes": [0, 1, 2, 3]})


def test_vision_contract_rejects_out_of_range_deepstack_index():
    cfg = tiny_config()
    cfg.vision_config.deepstack_visual_indexes = [1, 7]
    with pytest.raises(CheckpointError, match=r"\[1, 7\]"):
        V.vision_contract(cfg, 384)


# --- host constants ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(24, 24), (42, 42), (8, 12)])
def test_host_interpolation_and_positions_match_hf_helpers(h, w):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    grid = torch.tensor([[1, h, w]])
    want_i, want_w = get_vision_interpolation_indices_and_weights(
        grid, 8, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    got_i, got_w = V.interpolation_taps(h, w, 8, 2)
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_w, want_w)
    rows, cols = V.merge_order_rows_cols(h, w, 2)
    assert torch.equal(torch.stack([rows, cols], dim=-1), get_vision_position_ids(grid, 2))


# --- module and graph vs HF ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    m = Qwen3VLForConditionalGeneration(tiny_config()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():  # HF init leaves biases 0 and norms 1: a dropped one would hide
            if p.ndim != 1:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            else:
                p.copy_(1 + (torch.rand(p.shape, generator=gen) * 0.4 - 0.2))
        for blk in m.model.visual.blocks:  # peaky attention, so a wrong rotary/position order shows
            blk.attn.qkv.weight.mul_(8)
    return m


def _inputs(model, size, seed):
    return V.example_inputs(model.config, size, seed=seed)


@pytest.mark.parametrize("size", [384, 672, (192, 320), (320, 192)])  # HxW: the position embedding interpolated h != w
def test_vision_module_matches_hf(model, size):
    module = V.build_vision_module(model, size)
    previous = None
    for seed in (10, 11):
        pixel_values, grid = _inputs(model, size, seed)
        want_features, want_deepstack = V.reference_vision(model, pixel_values, grid)
        with torch.no_grad():
            features, deepstack = module(pixel_values, grid)
        assert deepstack.shape == (2, dims.tokens_per_image(model.config.vision_config, size), 64)
        assert (features - want_features).abs().max().item() <= 1e-5
        assert (deepstack - want_deepstack).abs().max().item() <= 1e-5
        if previous is not None:  # a second, different image must give different features
            assert (features - previous).abs().max().item() > 1e-2
        previous = features


def test_build_vision_module_rejects_392(model):
    with pytest.raises(RecipeError, match="multiples of 32"):
        V.build_vision_module(model, 392)


def test_vision_contract_describes_static_graph(model):
    contract = V.vision_contract(model.config, 384)
    assert contract.stage == "vision"
    assert [(t.name, t.dtype, t.shape) for t in contract.inputs] == [
        ("pixel_values", "float32", (576, 1536)),
        ("image_grid_thw", "int64", (1, 3)),
    ]
    assert [(t.name, t.dtype, t.shape) for t in contract.outputs] == [
        ("image_features", "float32", (144, 64)),
        ("deepstack_features", "float32", (2, 144, 64)),
    ]
    assert contract.meta == {
        "image_size": 384, "grid_thw": [1, 24, 24], "tokens_per_image": 144, "deepstack_layers": [0, 2]
    }
    flat = V.vision_contract(model.config, 384, deepstack=False)
    assert flat.output_names == ["image_features"] and flat.meta["deepstack_layers"] == []


def _onnx_io(path):
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("size", [384, 672])
def test_vision_onnx_matches_hf(model, tmp_path, size):
    path = tmp_path / "vision.onnx"
    contract = V.export_vision(model, size, path)
    assert _onnx_io(path) == (["pixel_values", "image_grid_thw"], ["image_features", "deepstack_features"])
    session = _session(path)
    for seed in (20, 21):  # neither is the export's example input
        pixel_values, grid = _inputs(model, size, seed)
        features, deepstack = session.run(None, {"pixel_values": pixel_values.numpy(), "image_grid_thw": grid.numpy()})
        want_features, want_deepstack = V.reference_vision(model, pixel_values, grid)
        assert features.shape == contract.output("image_features").shape
        assert deepstack.shape == contract.output("deepstack_features").shape
        assert np.abs(features - want_features.numpy()).max() <= 1e-4
        assert np.abs(deepstack - want_deepstack.numpy()).max() <= 1e-4


def test_vision_onnx_has_only_image_features_when_deepstack_false(model, tmp_path):
    path = tmp_path / "vision.onnx"
    contract = V.export_vision(model, 384, path, deepstack=False)
    assert contract.output_names == ["image_features"]
    assert _onnx_io(path) == (["pixel_values", "image_grid_thw"], ["image_features"])
    pixel_values, grid = _inputs(model, 384, 22)
    (features,) = _session(path).run(None, {"pixel_values": pixel_values.numpy(), "image_grid_thw": grid.numpy()})
    want_features, _ = V.reference_vision(model, pixel_values, grid)
    assert np.abs(features - want_features.numpy()).max() <= 1e-4
