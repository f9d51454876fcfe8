"""Fixed-size preprocessing vs HF's PIL image processor (`Qwen2VLImageProcessorPil`), pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmforge.core.errors import InputError
from vlmforge.host.preprocess import image_to_patches, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FAMILY_VISION = {
    "qwen2_5_vl": dict(patch_size=14, temporal_patch_size=2, merge_size=2, mean=CLIP_MEAN, std=CLIP_STD),
    "qwen3_vl": dict(patch_size=16, temporal_patch_size=2, merge_size=2, mean=(0.5,) * 3, std=(0.5,) * 3),
}
CASES = [("qwen2_5_vl", 392), ("qwen2_5_vl", 672), ("qwen3_vl", 384), ("qwen3_vl", 672)]
TOLERANCE = 1e-5


class _FixedSizeHF(Qwen2VLImageProcessorPil):
    """HF's processor with only the resize target forced to size x size.

    No min/max_pixels setting makes `smart_resize` map a non-square image to a square: it keeps the aspect
    ratio. Everything else (RGB conversion, PIL resample filter, rescale, normalize, patch order) is HF's.
    """

    fixed_size = 0

    def resize(self, image, size, resample, factor, **kwargs):
        target = SizeDict(height=self.fixed_size, width=self.fixed_size)
        return PilBackend.resize(self, image=image, size=target, resample=resample)


def hf_processor(family: str, size: int, *, force_size: bool = False) -> Qwen2VLImageProcessorPil:
    v = FAMILY_VISION[family]
    cls = type("Forced", (_FixedSizeHF,), {"fixed_size": size}) if force_size else Qwen2VLImageProcessorPil
    return cls(
        patch_size=v["patch_size"],
        temporal_patch_size=v["temporal_patch_size"],
        merge_size=v["merge_size"],
        image_mean=list(v["mean"]),
        image_std=list(v["std"]),
        min_pixels=size * size,
        max_pixels=size * size,
    )


def synthetic(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Gradients plus noise: smooth areas and sharp edges, so a wrong resample filter shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 7.0 + y / 11.0)], axis=-1)
    rgb = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "P":
        image = image.quantize(colors=64)
        image.info["transparency"] = 3  # palette entry 3 is transparent
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def compare(family: str, size: int, image: Image.Image, *, force_size: bool = False) -> float:
    v = FAMILY_VISION[family]
    pixel_values, grid = image_to_patches(image, size=size, **v)
    ref = hf_processor(family, size, force_size=force_size)(images=[image], return_tensors="np")
    side = size // v["patch_size"]
    np.testing.assert_array_equal(ref["image_grid_thw"], [[1, side, side]])
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert grid.dtype == np.int64
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == ref["pixel_values"].shape == (side * side, 3 * 2 * v["patch_size"] ** 2)
    diff = float(np.abs(pixel_values - ref["pixel_values"]).max())
    assert diff <= TOLERANCE, f"{family} {size} {image.mode} {image.size}: max abs diff {diff}"
    return diff


@pytest.mark.parametrize(("family", "size"), CASES)
def test_patches_match_hf_when_square_needs_no_resize(family, size):
    compare(family, size, synthetic(size, size, seed=1))


@pytest.mark.parametrize(("family", "size"), CASES)
def test_patches_match_hf_when_square_is_resized(family, size):
    compare(family, size, synthetic(2 * size, 2 * size, seed=2))  # smart_resize maps 2*size exactly to size


@pytest.mark.parametrize(("family", "size"), CASES)
def test_patches_match_hf_when_non_square_is_resized(family, size):
    compare(family, size, synthetic(640, 427, seed=3), force_size=True)
    compare(family, size, synthetic(200, 300, seed=4), force_size=True)  # upscaling too


@pytest.mark.parametrize(("family", "size"), CASES)
def test_patches_match_hf_when_rgba(family, size):
    compare(family, size, synthetic(size, size, "RGBA", seed=5))
    compare(family, size, synthetic(500, 333, "RGBA", seed=6), force_size=True)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK"])
def test_patches_match_hf_when_other_modes(mode):
    compare("qwen2_5_vl", 392, synthetic(392, 392, mode, seed=7))
    compare("qwen3_vl", 384, synthetic(300, 420, mode, seed=8), force_size=True)


def test_rgba_is_composited_onto_white():
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    pixel_values, _ = image_to_patches(image, size=32, **FAMILY_VISION["qwen3_vl"])
    np.testing.assert_allclose(pixel_values, 1.0)  # white, normalized with mean = std = 0.5


def test_patch_order_is_merge_window_order():
    """Patch rows come in 2x2 merge windows: row 1 is the patch right of row 0, row 2 the one below."""
    size, patch = 64, 16
    y, x = np.mgrid[0:size, 0:size]
    labels = (y // patch) * 10 + (x // patch)  # patch (r, c) -> 10 r + c
    image = Image.fromarray(np.dstack([labels] * 3).astype(np.uint8), "RGB")
    v = dict(FAMILY_VISION["qwen3_vl"], mean=(0.0,) * 3, std=(1 / 255,) * 3)
    pixel_values, grid = image_to_patches(image, size=size, **v)
    first = np.rint(pixel_values[:, 0]).astype(int).tolist()
    assert first == [0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]
    assert grid.tolist() == [[1, 4, 4]]


def test_image_to_patches_rejects_size_not_multiple_of_factor():
    with pytest.raises(InputError, match="not a positive multiple of patch_size\\*merge_size = 28") as err:
        image_to_patches(synthetic(384, 384), size=384, **FAMILY_VISION["qwen2_5_vl"])
    assert "364 or 392" in str(err.value)


def test_load_image_keeps_mode_and_applies_exif_orientation(tmp_path):
    png = tmp_path / "a.png"
    synthetic(40, 30, "RGBA").save(png)
    loaded = load_image(png)
    assert loaded.mode == "RGBA" and loaded.size == (40, 30)
    jpg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    synthetic(40, 30).save(jpg, exif=exif)
    assert load_image(str(jpg)).size == (30, 40)


def test_load_image_names_path_and_fix_when_missing_or_unreadable(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="not found") as err:
        load_image(missing)
    assert str(missing) in str(err.value) and "fix:" in str(err.value)
    with pytest.raises(InputError, match="not a regular file"):
        load_image(tmp_path)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not an image")
    with pytest.raises(InputError, match="cannot read image") as err:
        load_image(garbage)
    assert str(garbage) in str(err.value)
    whole = tmp_path / "whole.png"
    synthetic(64, 64).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError, match="cannot read image"):
        load_image(truncated)
