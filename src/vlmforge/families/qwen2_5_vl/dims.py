"""Qwen2.5-VL fixed-size vision dims: which image sides are valid and what they turn into.

Pure functions on plain ints and on any vision config (an HF `Qwen2_5_VLVisionConfig` or a plain dict
from `config.json`) with `patch_size`, `spatial_merge_size`, `temporal_patch_size` and `in_channels`
(no torch import). A fixed-size vision graph
only exists for sides that are multiples of patch × merge: the ViT cuts 14-px patches and the merger folds
2×2 of them into one language-model token, so anything else cannot be tiled (field notes §3).
"""

from __future__ import annotations

from typing import Any

from vlmforge.errors import RecipeError

PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
PATCH_MULTIPLE = PATCH_SIZE * SPATIAL_MERGE_SIZE  # 28


def check_image_size(size: int, where: str = "") -> None:
    """Raise RecipeError unless `size` is a positive multiple of 28 (patch 14 × merge 2)."""
    _check_multiple(size, PATCH_SIZE, SPATIAL_MERGE_SIZE, where)


def nearest_valid_sizes(size: int, multiple: int = PATCH_MULTIPLE) -> list[int]:
    """The valid sides around `size`, nearest first (one or two of them)."""
    below = (size // multiple) * multiple
    above = below + multiple
    candidates = [s for s in (below, above) if s > 0]
    return sorted(candidates, key=lambda s: (abs(s - size), s))


def grid_thw(vision_cfg: Any, image_size: int) -> tuple[int, int, int]:
    """(t, h, w) in patches for one square image: t is 1 (an image is one temporal patch of 2 frames)."""
    patch = _get(vision_cfg, "patch_size")
    _check_multiple(image_size, patch, _get(vision_cfg, "spatial_merge_size"), "")
    side = image_size // patch
    return (1, side, side)


def num_patches(vision_cfg: Any, image_size: int) -> int:
    """Rows of `pixel_values` for one image."""
    t, h, w = grid_thw(vision_cfg, image_size)
    return t * h * w


def tokens_per_image(vision_cfg: Any, image_size: int) -> int:
    """Rows of `image_features` = `<|image_pad|>` tokens for one image (patches / merge²)."""
    return num_patches(vision_cfg, image_size) // _get(vision_cfg, "spatial_merge_size") ** 2


def patch_dim(vision_cfg: Any) -> int:
    """Columns of `pixel_values`: channels × temporal patch × patch × patch (3·2·14·14 = 1176)."""
    return (
        _get(vision_cfg, "in_channels", 3)
        * _get(vision_cfg, "temporal_patch_size")
        * _get(vision_cfg, "patch_size") ** 2
    )


def out_hidden_size(vision_cfg: Any) -> int:
    """Columns of `image_features`: the merger's output width (= the language model's hidden size)."""
    return _get(vision_cfg, "out_hidden_size")


def _get(cfg: Any, key: str, *default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg[key] if not default else cfg.get(key, default[0])
    return getattr(cfg, key, *default)


def _check_multiple(size: int, patch: int, merge: int, where: str) -> None:
    multiple = patch * merge
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise RecipeError(
            f"Qwen2.5-VL image size must be a positive integer (pixels per side), got {size!r}",
            where=where,
            fix=f"use a multiple of {multiple}, e.g. 392 or 672",
        )
    if size % multiple:
        near = nearest_valid_sizes(size, multiple)
        options = " or ".join(str(s) for s in near)
        raise RecipeError(
            f"Qwen2.5-VL needs image sizes that are multiples of {multiple} (patch {patch} × merge {merge}); "
            f"got {size}",
            where=where,
            fix=f"use {options} (nearest multiples of {multiple})",
        )
