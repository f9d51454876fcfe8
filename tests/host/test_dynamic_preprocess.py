"""Dynamic-resolution preprocessing vs HF's own image processor, on the original image (no resizing by the test).

The reference is `Qwen2VLImageProcessorPil` built from each fixture's preprocessor_config.json — the class
transformers 5.23 loads for both families' checkpoints here (the torchvision `Qwen2VLImageProcessor` needs
torchvision, which does not import with this torch; tests/test_fixtures.py checks the fallback). It resizes
with PIL BICUBIC on uint8 like vlmforge, so pixel_values agree to float32 rounding of the normalisation:
tolerance 1e-5 absolute (observed 0.0), grids exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from vlmforge.core.errors import InputError
from vlmforge.families.qwen2_5_vl import fixture as qwen25_fixture
from vlmforge.families.qwen3_vl import fixture as qwen3_fixture
from vlmforge.fixtures.images import sample_image
from vlmforge.host.dynamic import DynamicImageParams, check_grid, pixel_bounds, smart_resize
from vlmforge.host.preprocess import image_to_patches

TOLERANCE = 1e-5
CONFIGS = {"qwen2_5_vl": qwen25_fixture.image_processor_config(), "qwen3_vl": qwen3_fixture.image_processor_config()}
# (width, height): tiny, odd non-multiple, tall portrait, large landscape, the photo size, past max_pixels
SIZES = [(56, 56), (451, 300), (300, 1200), (1344, 896), (500, 333)]
QWEN_DEFAULT_MAX = 28 * 28 * 1280  # HF's default budget: 1344x896 and 1600x1200 exceed it


def params(cfg: dict, max_pixels: int | None = None) -> DynamicImageParams:
    lo, hi = pixel_bounds(cfg)
    return DynamicImageParams(cfg["patch_size"], cfg["temporal_patch_size"], cfg["merge_size"], lo,
                              max_pixels or hi, tuple(cfg["image_mean"]), tuple(cfg["image_std"]))


def hf_processor(cfg: dict, max_pixels: int | None = None) -> Qwen2VLImageProcessorPil:
    kwargs = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
        kwargs["size"] = {**kwargs["size"], "longest_edge": max_pixels}
    return Qwen2VLImageProcessorPil(**kwargs)


def assert_matches_hf(family: str, images, max_pixels: int | None = None):
    cfg = CONFIGS[family]
    pixel_values, grid = params(cfg, max_pixels).patches(images)
    ref = hf_processor(cfg, max_pixels)(images=list(images), return_tensors="np")
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert grid.dtype == np.int64 and pixel_values.dtype == np.float32
    assert pixel_values.shape == ref["pixel_values"].shape
    assert float(np.abs(pixel_values - ref["pixel_values"]).max()) <= TOLERANCE
    return grid


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_patches_match_hf_processor_on_original_image(family, size):
    grid = assert_matches_hf(family, [sample_image(7, size)])
    factor = CONFIGS[family]["patch_size"] * CONFIGS[family]["merge_size"]
    h, w = smart_resize(size[1], size[0], factor, *pixel_bounds(CONFIGS[family]))
    assert grid.tolist() == [[1, h // CONFIGS[family]["patch_size"], w // CONFIGS[family]["patch_size"]]]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_patches_match_hf_beyond_max_pixels(family):
    """Beyond max_pixels the image is resized down (as HF does), not refused."""
    image = sample_image(8, (1600, 1200))
    grid = assert_matches_hf(family, [image], max_pixels=QWEN_DEFAULT_MAX)
    patch = CONFIGS[family]["patch_size"]
    assert grid[0, 1] * grid[0, 2] * patch * patch <= QWEN_DEFAULT_MAX < 1600 * 1200


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_several_images_concatenate_like_hf(family):
    images = [sample_image(9, (451, 300)), sample_image(10, (300, 1200), mode="RGBA"), sample_image(11, (56, 56), "L")]
    grid = assert_matches_hf(family, images)
    assert len({tuple(g) for g in grid.tolist()}) == 3


def test_smart_resize_matches_hf_everywhere():
    """Every rounding branch: round-half-to-even, floor above max_pixels, ceil below min_pixels."""
    for factor, lo, hi in ((28, 56 * 56, 28 * 28 * 1280), (32, 256 * 256, 4096 * 4096), (28, 3136, 200_000)):
        for h in (1, 14, 42, 70, 97, 300, 451, 1000, 2017):
            for w in (1, 28, 42, 56, 333, 500, 1200, 3001):
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)
    assert smart_resize(42, 42, 28, 1, 10**9) == (56, 56) == hf_smart_resize(42, 42, 28, 1, 10**9)  # 1.5 -> 2
    assert smart_resize(70, 70, 28, 1, 10**9) == (56, 56) == hf_smart_resize(70, 70, 28, 1, 10**9)  # 2.5 -> 2


def test_smart_resize_refuses_extreme_aspect_ratio_clearly():
    with pytest.raises(InputError, match="aspect ratio") as err:
        smart_resize(10, 2500, 28, 3136, 10**7)
    assert "crop or pad" in err.value.fix


def test_square_fixed_path_is_unchanged():
    """A square image inside the pixel budget goes through both paths to the same patches."""
    cfg = CONFIGS["qwen2_5_vl"]
    image = sample_image(12, (392, 392))
    fixed = image_to_patches(image, size=392, patch_size=14, temporal_patch_size=2, merge_size=2,
                             mean=cfg["image_mean"], std=cfg["image_std"])
    dynamic = params(cfg).patches(image)
    np.testing.assert_array_equal(fixed[0], dynamic[0])
    np.testing.assert_array_equal(fixed[1], dynamic[1])


def test_tokens_count_what_patches_produce():
    p = params(CONFIGS["qwen3_vl"])
    for w, h in SIZES:
        _, grid = p.patches(sample_image(1, (w, h)))
        assert p.tokens(h, w) == int(grid[0, 1] * grid[0, 2]) // 4


def test_pixel_bounds_read_like_hf():
    assert pixel_bounds(CONFIGS["qwen3_vl"]) == (256 * 256, 4096 * 4096)
    assert pixel_bounds({"size": {"shortest_edge": 10, "longest_edge": 20}, "max_pixels": 30}) == (10, 30)
    with pytest.raises(InputError, match="no pixel bounds"):
        pixel_bounds({"size": {"height": 3}})
    with pytest.raises(InputError, match="not 0 < min <= max"):
        pixel_bounds({"min_pixels": 50, "max_pixels": 10})


# --- check_grid: the runtime's guard for a pair the graph cannot take ---------------------------------

PATCH_DIM = 3 * 2 * 14 * 14


def test_check_grid_accepts_what_the_processor_makes():
    pixel_values, grid = params(CONFIGS["qwen2_5_vl"]).patches([sample_image(1, (451, 300)), sample_image(2)])
    check_grid(pixel_values.shape, grid, patch_dim=PATCH_DIM, merge_size=2)


@pytest.mark.parametrize(
    ("shape", "grid", "message"),
    [
        ((100, PATCH_DIM), [[1, 10, 12]], "100 patch rows but image_grid_thw"),
        ((120, PATCH_DIM), [1, 10, 12], r"shape \[3\]"),
        ((120, PATCH_DIM), np.zeros((0, 3), np.int64), r"shape \[0, 3\]"),
        ((120, PATCH_DIM), [[1.0, 10.0, 12.0]], "must hold integers"),
        ((120, PATCH_DIM), [[1, 10, 11]], "multiples of the merge size 2"),
        ((0, PATCH_DIM), [[0, 10, 12]], "must be positive"),
        ((120, 1536), [[1, 10, 12]], rf"\[num_patches, {PATCH_DIM}\]"),
        ((120,), [[1, 10, 12]], rf"\[num_patches, {PATCH_DIM}\]"),
    ],
)
def test_check_grid_names_what_is_wrong_and_the_fix(shape, grid, message):
    with pytest.raises(InputError, match=message) as err:
        check_grid(shape, grid, patch_dim=PATCH_DIM, merge_size=2, where="vision.onnx")
    assert err.value.where == "vision.onnx"
    assert "DynamicImageParams.patches" in err.value.fix


def test_factor_and_patch_dim():
    p = params(CONFIGS["qwen3_vl"])
    assert (p.factor, p.patch_dim) == (32, 1536)
    assert math.isclose(p.to_json()["mean"][0], 0.5)
