"""Qwen3-VL dynamic-resolution vision: the module and its ONNX graph (features and DeepStack features) vs
the stock HF path, on images preprocessed exactly as HF does (host.dynamic), several sizes in one call."""

from __future__ import annotations

import onnx
import pytest
import torch

from vlmforge.families.qwen3_vl import fixture
from vlmforge.families.qwen3_vl import vision as fixed
from vlmforge.families.qwen3_vl import vision_dynamic as V
from vlmforge.fixtures.images import sample_image
from vlmforge.host.dynamic import DynamicImageParams, pixel_bounds
from vlmforge.validators.metrics import metrics

MAX_REL = 5e-5  # the FP32 bar; observed ~1e-6
# (width, height) of each image of one call; the fixture's pixel budget (256² .. 4096²): 56x56 is upscaled
CASES = {
    "56x56": [(56, 56)],
    "451x300": [(451, 300)],
    "300x1200": [(300, 1200)],
    "1344x896": [(1344, 896)],
    "500x333": [(500, 333)],
    "384x384+448x448": [(384, 384), (448, 448)],
    "451x300+300x1200+56x56": [(451, 300), (300, 1200), (56, 56)],
}


@pytest.fixture(scope="module")
def hf_model():
    return fixture.build_model()


@pytest.fixture(scope="module")
def preprocess() -> DynamicImageParams:
    cfg = fixture.image_processor_config()
    return DynamicImageParams(cfg["patch_size"], cfg["temporal_patch_size"], cfg["merge_size"], *pixel_bounds(cfg),
                              tuple(cfg["image_mean"]), tuple(cfg["image_std"]))


@pytest.fixture(scope="module")
def onnx_path(qwen3_dynamic):
    """The vision graph of the session's vision=dynamic build (the same export, of the same fixture weights as
    `hf_model`: fixture.write_fixture saves fixture.build_model()), so the suite exports it once."""
    return qwen3_dynamic.directory / "vision.onnx"


@pytest.fixture(scope="module")
def session(onnx_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def inputs(preprocess, sizes, seed=0):
    pixel_values, grid = preprocess.patches([sample_image(seed + i, size) for i, size in enumerate(sizes)])
    return torch.from_numpy(pixel_values), torch.from_numpy(grid)


def assert_close(got, want):
    features, deepstack = got
    assert features.shape == want[0].shape and deepstack.shape == want[1].shape
    assert deepstack.shape[0] == 2  # the fixture's deepstack_visual_indexes [0, 2]
    assert metrics(features, want[0])["max_rel"] <= MAX_REL
    assert metrics(deepstack, want[1])["max_rel"] <= MAX_REL


# The PyTorch module (what is exported) on the cases that are cheap in eager PyTorch; the ONNX graph, the
# product, is checked on every case below (the largest, 1344x896, cost 7-14 s here and adds no path).
MODULE_CASES = ("56x56", "451x300", "500x333", "451x300+300x1200+56x56")


@pytest.mark.parametrize("case", MODULE_CASES)
def test_dynamic_module_matches_hf(hf_model, preprocess, case):
    pixel_values, grid = inputs(preprocess, CASES[case])
    with torch.no_grad():
        got = V.build_vision_module(hf_model)(pixel_values, grid)
    want = fixed.reference_vision(hf_model, pixel_values, grid)
    assert got[0].shape == (int(grid.prod(-1).sum()) // 4, 64)
    assert_close([t.numpy() for t in got], [t.numpy() for t in want])


@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_onnx_matches_hf(hf_model, preprocess, session, case):
    pixel_values, grid = inputs(preprocess, CASES[case], seed=10)
    want = [t.numpy() for t in fixed.reference_vision(hf_model, pixel_values, grid)]
    got = session.run(None, {"pixel_values": pixel_values.numpy(), "image_grid_thw": grid.numpy()})
    assert_close(got, want)


def test_dynamic_module_matches_hf_on_video_grids(hf_model):
    """t > 1 (frames): per-frame attention segments and position interpolation, as HF."""
    pixel_values, grid = V.example_inputs(hf_model.config, grids=((2, 8, 12), (1, 4, 8)), seed=3)
    with torch.no_grad():
        got = V.build_vision_module(hf_model)(pixel_values, grid)
    assert_close([t.numpy() for t in got], [t.numpy() for t in fixed.reference_vision(hf_model, pixel_values, grid)])


def test_dynamic_module_without_deepstack_gives_the_same_features(hf_model):
    pixel_values, grid = V.example_inputs(hf_model.config, seed=4)
    with torch.no_grad():
        (plain,) = V.build_vision_module(hf_model, deepstack=False)(pixel_values, grid)
        full, _ = V.build_vision_module(hf_model)(pixel_values, grid)
    torch.testing.assert_close(plain, full, rtol=0, atol=0)
    assert V.vision_contract(hf_model.config, deepstack=False).output_names == ["image_features"]


def test_interpolation_taps_match_hf():
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from vlmforge.families import dynamic_grid as G

    grid = torch.tensor([[1, 18, 28], [1, 16, 16], [2, 4, 6]])
    coords = G.patch_coords(grid, int(grid.prod(-1).sum()), 2)
    indices, weights = V.interpolation_taps(coords, 8)
    want_i, want_w = get_vision_interpolation_indices_and_weights(grid, 8, "bilinear", True, 2)
    assert torch.equal(indices, want_i) and torch.equal(weights, want_w)


def test_dynamic_onnx_has_symbolic_io_and_ir_at_most_13(onnx_path):
    model = onnx.load(str(onnx_path))
    assert model.ir_version <= 13  # onnxruntime-node 1.30 (transformers.js) refuses 14
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18)}
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.input, *model.graph.output)}
    assert shapes == {"pixel_values": ["num_patches", 1536], "image_grid_thw": ["num_images", 3],
                      "image_features": ["num_image_tokens", 64],
                      "deepstack_features": [2, "num_image_tokens", 64]}
    assert "Conv" not in {n.op_type for n in model.graph.node}
