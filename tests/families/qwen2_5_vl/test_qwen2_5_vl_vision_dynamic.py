"""Qwen2.5-VL dynamic-resolution vision: the module and its ONNX graph vs the stock HF tower, on images
preprocessed exactly as HF does (host.dynamic), at any size and with several sizes in one call."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vlmforge.families.qwen2_5_vl import fixture
from vlmforge.families.qwen2_5_vl import vision as fixed
from vlmforge.families.qwen2_5_vl import vision_dynamic as V
from vlmforge.fixtures.images import sample_image
from vlmforge.host.dynamic import DynamicImageParams, pixel_bounds
from vlmforge.validators.metrics import metrics

MAX_REL = 5e-5  # the FP32 bar; observed ~1e-6
# (width, height) of each image of one call; HF's default pixel budget, so 1344x896 is resized down a little
CASES = {
    "56x56": [(56, 56)],
    "451x300": [(451, 300)],
    "300x1200": [(300, 1200)],
    "1344x896": [(1344, 896)],
    "500x333": [(500, 333)],
    "392x392+448x448": [(392, 392), (448, 448)],
    "451x300+300x1200+56x56": [(451, 300), (300, 1200), (56, 56)],
}


@pytest.fixture(scope="module")
def hf_model():
    return fixture.build_model()


@pytest.fixture(scope="module")
def preprocess() -> DynamicImageParams:
    cfg = fixture.image_processor_config()
    return DynamicImageParams(cfg["patch_size"], cfg["temporal_patch_size"], cfg["merge_size"],
                              *pixel_bounds({**cfg, "max_pixels": 28 * 28 * 1280}),
                              tuple(cfg["image_mean"]), tuple(cfg["image_std"]))


@pytest.fixture(scope="module")
def onnx_path(qwen25_dynamic):
    """The vision graph of the session's vision=dynamic build (the same export, of the same fixture weights as
    `hf_model`: fixture.write_fixture saves fixture.build_model()), so the suite exports it once."""
    return qwen25_dynamic.directory / "vision.onnx"


@pytest.fixture(scope="module")
def session(onnx_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def inputs(preprocess, sizes, seed=0):
    pixel_values, grid = preprocess.patches([sample_image(seed + i, size) for i, size in enumerate(sizes)])
    return torch.from_numpy(pixel_values), torch.from_numpy(grid)


# The PyTorch module (what is exported) on the cases that are cheap in eager PyTorch; the ONNX graph, the
# product, is checked on every case below (the largest, 1344x896, cost 7-14 s here and adds no path).
MODULE_CASES = ("56x56", "451x300", "500x333", "451x300+300x1200+56x56")


@pytest.mark.parametrize("case", MODULE_CASES)
def test_dynamic_module_matches_hf(hf_model, preprocess, case):
    pixel_values, grid = inputs(preprocess, CASES[case])
    with torch.no_grad():
        got = V.build_vision_module(hf_model)(pixel_values, grid)
    want = fixed.reference_vision(hf_model, pixel_values, grid)
    assert got.shape == want.shape == (int(grid.prod(-1).sum()) // 4, 64)
    assert metrics(got.numpy(), want.numpy())["max_rel"] <= MAX_REL


@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_onnx_matches_hf(hf_model, preprocess, session, case):
    pixel_values, grid = inputs(preprocess, CASES[case], seed=10)
    want = fixed.reference_vision(hf_model, pixel_values, grid).numpy()
    (got,) = session.run(None, {"pixel_values": pixel_values.numpy(), "image_grid_thw": grid.numpy()})
    assert got.shape == want.shape
    assert metrics(got, want)["max_rel"] <= MAX_REL


def test_dynamic_module_matches_hf_on_video_grids(hf_model):
    """t > 1 (frames): per-frame attention segments and windows, as HF's cu_seqlens / window index."""
    pixel_values, grid = V.example_inputs(hf_model.config, grids=((2, 8, 12), (1, 4, 8)), seed=3)
    with torch.no_grad():
        got = V.build_vision_module(hf_model)(pixel_values, grid)
    assert metrics(got.numpy(), fixed.reference_vision(hf_model, pixel_values, grid).numpy())["max_rel"] <= MAX_REL


def test_dynamic_onnx_has_symbolic_io_and_ir_at_most_13(onnx_path):
    model = onnx.load(str(onnx_path))
    assert model.ir_version <= 13  # onnxruntime-node 1.30 (transformers.js) refuses 14
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18)}
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.input, *model.graph.output)}
    assert shapes == {"pixel_values": ["num_patches", 1176], "image_grid_thw": ["num_images", 3],
                      "image_features": ["num_image_tokens", 64]}
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" not in ops and "Loop" not in ops  # patch embedding is a MatMul; windows are batched


def test_window_layout_matches_hf_window_index():
    """Every HF window is one segment of ours, with the same patches (HF's order within it aside)."""
    from transformers.vision_utils import get_vision_window_index

    from vlmforge.families import dynamic_grid as G

    grid = torch.tensor([[1, 22, 32], [1, 8, 8], [1, 86, 22]])
    coords = G.patch_coords(grid, int(grid.prod(-1).sum()), 2)
    layout = G.window_layout(coords, 2, 4, torch.float32)
    index, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    patches = (index[:, None] * 4 + torch.arange(4)).reshape(-1)
    hf_windows = [sorted(patches[a:b].tolist()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    slots = layout.gather.reshape(layout.num_segments, layout.length)
    valid = (layout.key_mask == 0).reshape(layout.num_segments, layout.length)
    ours = [sorted(s[v].tolist()) for s, v in zip(slots, valid)]
    assert ours == hf_windows
