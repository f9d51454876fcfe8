"""Image -> `pixel_values` for a dynamic-resolution vision graph, as HF's Qwen2-VL image processor does it.

Both families preprocess with `Qwen2VLImageProcessor` (PIL backend `Qwen2VLImageProcessorPil`): the image
keeps its aspect ratio, `smart_resize` picks sides that are multiples of patch × merge within
[min_pixels, max_pixels] (Python's `round`, i.e. half to even, as HF), then RGB conversion, PIL BICUBIC
resize, rescale, normalize and the merge-window patch order exactly as the fixed-size path
(`host.preprocess`). Several images are concatenated row-wise, their grids stacked: the two inputs a
dynamic vision graph (and onnxruntime-genai) takes.

`check_grid` is the runtime's guard for a (pixel_values, image_grid_thw) pair the graph cannot take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlmforge.core.errors import InputError
from vlmforge.host.preprocess import _patchify, to_rgb

__all__ = ["DynamicImageParams", "check_grid", "image_to_patches_dynamic", "pixel_bounds", "smart_resize"]

MAX_ASPECT_RATIO = 200  # HF refuses anything more elongated


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) multiples of `factor` with min_pixels <= h*w <= max_pixels, aspect ratio kept.

    The arithmetic of `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`, step for step.
    """
    if min(height, width) <= 0:
        raise InputError(f"image has no pixels ({width}x{height})", where="vlmforge.host.dynamic.smart_resize",
                         fix="pass a non-empty image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} ({width}x{height}) exceeds "
            f"{MAX_ASPECT_RATIO}, which the Qwen-VL image processor refuses",
            where="vlmforge.host.dynamic.smart_resize",
            fix=f"crop or pad the image to an aspect ratio below {MAX_ASPECT_RATIO}:1",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_to_patches_dynamic(
    image: Image.Image,
    *,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    min_pixels: int,
    max_pixels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (`pixel_values` float32 ``[gh*gw, 3*T*P*P]``, `grid_thw` int64 ``[[1, gh, gw]]``)."""
    rgb = to_rgb(image)
    width, height = rgb.size
    new_h, new_w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return _patchify(np.ascontiguousarray(pixels.transpose(2, 0, 1)), patch_size, temporal_patch_size, merge_size)


@dataclass(frozen=True)
class DynamicImageParams:
    """The preprocessing of a dynamic vision set: grid facts, pixel budget and normalisation."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dynamic = True  # any size within the pixel budget (host.image.ImageParams: False)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def patches(self, images: Image.Image | Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """One image or several -> (`pixel_values` rows of all images in order, `image_grid_thw` [I, 3])."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise InputError("no images given", where="vlmforge.host.dynamic.DynamicImageParams.patches",
                             fix="pass at least one image")
        parts = [image_to_patches_dynamic(
            img, patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
            mean=self.mean, std=self.std) for img in images]
        return np.concatenate([p for p, _ in parts]), np.concatenate([g for _, g in parts])

    def image_tokens(self, image: Image.Image) -> int:
        """`<|image_pad|>` tokens `image` (PIL, any size) becomes."""
        width, height = image.size
        return self.tokens(height, width)

    @property
    def hf_size(self) -> dict:
        """The `size` HF's image processor is given for this pixel budget (its smart_resize bounds)."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @classmethod
    def from_json(cls, data: dict) -> "DynamicImageParams":
        return cls(int(data["patch_size"]), int(data["temporal_patch_size"]), int(data["merge_size"]),
                   int(data["min_pixels"]), int(data["max_pixels"]), tuple(float(x) for x in data["mean"]),
                   tuple(float(x) for x in data["std"]))

    def tokens(self, height: int, width: int) -> int:
        """`<|image_pad|>` tokens an image of this size becomes."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return (h // self.factor) * (w // self.factor)

    def to_json(self) -> dict:
        return {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "mean": list(self.mean), "std": list(self.std)}


def pixel_bounds(preprocessor_config: dict, where: str = "preprocessor_config.json") -> tuple[int, int]:
    """(min_pixels, max_pixels) as HF's processor reads them: `size.shortest_edge` / `size.longest_edge`,
    overridden by top-level `min_pixels` / `max_pixels` (the processor's backward-compatible keys)."""
    size = preprocessor_config.get("size") or {}
    lo = preprocessor_config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    hi = preprocessor_config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    if lo is None or hi is None:
        raise InputError("the image processor config gives no pixel bounds (size.shortest_edge/longest_edge or "
                         "min_pixels/max_pixels)", where=where, fix="add min_pixels and max_pixels to it")
    lo, hi = int(lo), int(hi)
    if not 0 < lo <= hi:
        raise InputError(f"pixel bounds min_pixels={lo}, max_pixels={hi} are not 0 < min <= max", where=where,
                         fix="set min_pixels to at most max_pixels, both positive")
    return lo, hi


def check_grid(pixel_shape: Sequence[int], grid_thw, *, patch_dim: int, merge_size: int,
               where: str = "vision inputs") -> None:
    """InputError unless (`pixel_values` of shape `pixel_shape`, `image_grid_thw`) is a pair a dynamic
    vision graph takes: grid [num_images, 3] of positive ints, h and w multiples of the merge size, and
    `pixel_values` [sum(t*h*w), patch_dim]. Called before the graph runs, so a bad pair is this error,
    not an onnxruntime shape failure (or, worse, silently wrong features)."""
    fix = ("preprocess the images with the set's own processor (vlmforge.host.dynamic.DynamicImageParams.patches) "
           "and pass its pixel_values and image_grid_thw together, unmodified")
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] < 1:
        raise InputError(f"image_grid_thw has shape {list(grid.shape)}; a dynamic vision graph takes "
                         "[num_images, 3] (t, h, w in patches) with num_images >= 1", where=where, fix=fix)
    if not np.issubdtype(grid.dtype, np.integer):
        raise InputError(f"image_grid_thw is {grid.dtype}; it must hold integers (int64)", where=where, fix=fix)
    bad = [i for i, (t, h, w) in enumerate(grid.tolist()) if min(t, h, w) < 1 or h % merge_size or w % merge_size]
    if bad:
        raise InputError(
            f"image_grid_thw row {bad[0]} is {grid[bad[0]].tolist()}: t, h and w must be positive and h, w "
            f"multiples of the merge size {merge_size}", where=where, fix=fix)
    shape = tuple(int(d) for d in pixel_shape)
    expected = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    if len(shape) != 2 or shape[1] != patch_dim:
        raise InputError(f"pixel_values has shape {list(shape)}; this vision graph takes "
                         f"[num_patches, {patch_dim}] (C·T·P·P values per patch)", where=where, fix=fix)
    if shape[0] != expected:
        raise InputError(
            f"pixel_values has {shape[0]} patch rows but image_grid_thw {grid.tolist()} describes "
            f"{expected} (sum of t*h*w)", where=where, fix=fix)
