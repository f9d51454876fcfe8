"""Image -> `pixel_values` for a fixed-size vision graph, bit-compatible with HF's PIL image processor.

Mirrors `transformers.Qwen2VLImageProcessorPil` (the processor both families use) step by step:
RGB conversion compositing any transparency onto white (`image_transforms.convert_to_rgb`), PIL
BICUBIC resize, rescale by 1/255 in float64 then cast to float32, normalize in float32, duplicate each
frame `temporal_patch_size` times and flatten patches in merge-window order
(``grid_h/m, grid_w/m, m, m`` rows of ``C, T, P, P`` values). The only deliberate difference: the output
is always the set's fixed size (`size` x `size`, or height x width), the image stretched to it (BICUBIC, as
HF's processor does when given that size and onnxruntime-genai's Resize with smart_resize 0), where HF's
`smart_resize` keeps the aspect ratio.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmforge.core.errors import InputError
from vlmforge.host.sizes import size_hw

log = logging.getLogger(__name__)

__all__ = ["image_to_patches", "load_image", "to_rgb"]


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, upright per its EXIF orientation (as HF `load_image`).

    The mode is kept (alpha included): `image_to_patches` composites transparency onto white like the
    HF image processor and qwen-vl-utils do; HF `load_image` itself would drop alpha with ``convert("RGB")``.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise InputError(
            "image file not found" if not os.path.exists(where) else "image path is not a regular file",
            where=where,
            fix="pass the path of an existing image file (PNG, JPEG, WebP, ...)",
        )
    try:
        with Image.open(where) as img:
            img.load()
            image = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise InputError(
            f"cannot read image: {err}",
            where=where,
            fix="check that the file is a complete image in a format Pillow reads (PNG, JPEG, WebP, ...)",
        ) from err
    log.debug("loaded %s: mode %s size %s", where, image.mode, image.size)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion as HF `convert_to_rgb`: alpha (or palette transparency) is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_patches(
    image: Image.Image,
    *,
    size,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (`pixel_values` float32 ``[grid_h*grid_w, 3*T*P*P]``, `grid_thw` int64 ``[[1, gh, gw]]``).
    `size`: a square side or (height, width); an image of another size is stretched to it."""
    height, width = size_hw(size)
    for side in dict.fromkeys((height, width)):  # each side once, height first
        _check_size(side, patch_size, merge_size)
    rgb = to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    return _patchify(chw, patch_size, temporal_patch_size, merge_size)


def _patchify(chw: np.ndarray, patch: int, temporal: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    channels, height, width = chw.shape
    gh, gw = height // patch, width // patch
    x = chw.reshape(channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, mh, mw, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, *x.shape[5:]))
    pixel_values = np.ascontiguousarray(x.reshape(gh * gw, channels * temporal * patch * patch), dtype=np.float32)
    return pixel_values, np.array([[1, gh, gw]], dtype=np.int64)


def _check_size(size: int, patch_size: int, merge_size: int) -> None:
    factor = patch_size * merge_size
    if size <= 0 or size % factor:
        below, above = max(factor, size // factor * factor), (size // factor + 1) * factor
        raise InputError(
            f"vision size {size} is not a positive multiple of patch_size*merge_size = {factor}",
            where="vlmforge.host.preprocess.image_to_patches",
            fix=f"use a multiple of {factor}, e.g. {below} or {above}",
        )
