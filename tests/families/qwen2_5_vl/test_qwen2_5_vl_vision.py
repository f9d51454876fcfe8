"""Qwen2.5-VL vision stage: fixed-size dims, the static-shape module and its ONNX graph vs stock HF."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vlmforge.core.errors import RecipeError
from vlmforge.families.qwen2_5_vl import dims
from vlmforge.families.qwen2_5_vl import vision as V
from vlmforge.families.qwen2_5_vl.fixture import tiny_config


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0, which would hide a dropped one
        for name, p in model.model.visual.named_parameters():
            if p.ndim != 1:
                continue
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.2 * (2 * torch.rand(p.shape, generator=gen) - 1))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def onnx_392(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("vision") / "vision.onnx"
    contract = V.export_vision(hf_model, 392, path)
    return path, contract


def _ort_session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_ort(session, pixel_values, grid):
    return session.run(None, {"pixel_values": pixel_values.numpy(), "image_grid_thw": grid.numpy()})[0]


# --- dims -------------------------------------------------------------------------------------------


def test_check_image_size_rejects_384_and_suggests_392():
    with pytest.raises(RecipeError) as err:
        dims.check_image_size(384, where="recipes/vision/384.yaml")
    msg = str(err.value)
    assert "Qwen2.5-VL needs image sizes that are multiples of 28 (patch 14 × merge 2)" in msg
    assert "recipes/vision/384.yaml" in msg
    assert err.value.fix.startswith("use 392")


@pytest.mark.parametrize("size", [0, -28, 28.0, True, "392", 400, 13])
def test_check_image_size_rejects_invalid_sizes(size):
    with pytest.raises(RecipeError):
        dims.check_image_size(size)


@pytest.mark.parametrize("size", [28, 392, 448, 672])
def test_check_image_size_accepts_multiples_of_28(size):
    dims.check_image_size(size)


def test_dims_match_field_notes():
    vcfg = tiny_config().vision_config
    assert dims.grid_thw(vcfg, 392) == (1, 28, 28)
    assert (dims.num_patches(vcfg, 392), dims.tokens_per_image(vcfg, 392)) == (784, 196)
    assert (dims.num_patches(vcfg, 672), dims.tokens_per_image(vcfg, 672)) == (2304, 576)
    assert dims.patch_dim(vcfg) == 1176
    as_dict = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    assert dims.patch_dim(as_dict) == 1176 and dims.grid_thw(as_dict, 672) == (1, 48, 48)


def test_vision_contract_is_concrete():
    c = V.vision_contract(tiny_config(), 392)
    assert c.stage == "vision"
    assert [(t.name, t.dtype, t.shape) for t in c.inputs] == [
        ("pixel_values", "float32", (784, 1176)),
        ("image_grid_thw", "int64", (1, 3)),
    ]
    assert [(t.name, t.dtype, t.shape) for t in c.outputs] == [("image_features", "float32", (196, 64))]
    assert c.meta == {"image_size": 392, "grid_thw": [1, 28, 28], "tokens_per_image": 196}


def test_vision_contract_of_a_non_square_size_is_height_x_width():
    c = V.vision_contract(tiny_config(), (196, 336))
    assert c.input("pixel_values").shape == (14 * 24, 1176) and c.output("image_features").shape == (7 * 12, 64)
    assert c.meta == {"image_size": [196, 336], "grid_thw": [1, 14, 24], "tokens_per_image": 84}
    with pytest.raises(RecipeError, match="got width 330"):
        V.vision_contract(tiny_config(), (196, 330))


def test_build_vision_module_rejects_384(hf_model):
    with pytest.raises(RecipeError, match="multiples of 28"):
        V.build_vision_module(hf_model, 384)


# --- VisionForExport vs stock HF --------------------------------------------------------------------


def test_vision_layout_batches_uneven_edge_windows_at_392(hf_model):
    module = V.build_vision_module(hf_model, 392)  # merged grid 14×14, 4×4 windows: 16 / 8 / 4 units
    assert (module.num_windows, module.window_len, module.uniform_windows) == (16, 64, False)
    assert sorted(set((~module.win_mask.bool()).sum(-1).flatten().tolist())) == [16, 32, 64]
    module = V.build_vision_module(hf_model, 672)  # merged grid 24×24: 36 full windows, no mask needed
    assert (module.num_windows, module.window_len, module.uniform_windows) == (36, 64, True)
    module = V.build_vision_module(hf_model, (196, 336))  # merged 7×12: 2×3 windows, the bottom row 3 units high
    assert (module.num_windows, module.window_len, module.uniform_windows) == (6, 64, False)
    assert sorted(set((~module.win_mask.bool()).sum(-1).flatten().tolist())) == [48, 64]


@pytest.mark.parametrize("size", [392, 672, (196, 336), (336, 196)])  # HxW: short edge windows, both ways
def test_vision_module_matches_hf(hf_model, size):
    module = V.build_vision_module(hf_model, size)
    outputs = []
    for seed in (1, 2):  # two different images: a graph that baked one in would fail the second
        pixel_values, grid = V.example_inputs(hf_model.config, size, seed=seed)
        with torch.no_grad():
            got = module(pixel_values, grid)
        want = V.reference_vision(hf_model, pixel_values, grid)
        assert got.shape == want.shape == (dims.tokens_per_image(tiny_config().vision_config, size), 64)
        assert (got - want).abs().max().item() <= 1e-5
        outputs.append(want)
    assert (outputs[0] - outputs[1]).abs().max().item() > 1e-2


# --- exported ONNX ----------------------------------------------------------------------------------


def test_vision_onnx_keeps_image_grid_thw_input(onnx_392):
    path, contract = onnx_392
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixel_values", "image_grid_thw"] == contract.input_names
    assert [o.name for o in graph.output] == ["image_features"]
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)}
    assert shapes == {"pixel_values": [784, 1176], "image_grid_thw": [1, 3], "image_features": [196, 64]}
    assert "Conv" not in {n.op_type for n in graph.node}  # patch embedding is a MatMul


def test_vision_onnx_matches_hf_at_392(hf_model, onnx_392):
    session = _ort_session(onnx_392[0])
    for seed in (3, 4):
        pixel_values, grid = V.example_inputs(hf_model.config, 392, seed=seed)
        want = V.reference_vision(hf_model, pixel_values, grid).numpy()
        got = _run_ort(session, pixel_values, grid)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


def test_vision_onnx_matches_hf_at_672(hf_model, tmp_path):
    V.export_vision(hf_model, 672, tmp_path / "vision.onnx")
    pixel_values, grid = V.example_inputs(hf_model.config, 672, seed=5)
    want = V.reference_vision(hf_model, pixel_values, grid).numpy()
    got = _run_ort(_ort_session(tmp_path / "vision.onnx"), pixel_values, grid)
    assert got.shape == (576, 64)
    assert np.abs(got - want).max() <= 1e-4
