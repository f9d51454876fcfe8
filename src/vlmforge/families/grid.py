"""Patch-grid math shared by the families' fixed-size vision stages (pure; no torch).

Works on any vision config (an HF vision config or a plain dict from `config.json`) with `patch_size`,
`spatial_merge_size`, `temporal_patch_size` and `in_channels`. A fixed-size vision graph only exists for
sides that are multiples of patch × merge: the ViT cuts square patches and the merger folds merge×merge of
them into one language-model token, so anything else cannot be tiled (field notes §3).
"""

from __future__ import annotations

from typing import Any

from vlmforge.core.errors import RecipeError
from vlmforge.host.sizes import size_hw


def get(cfg: Any, key: str, *default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg[key] if not default else cfg.get(key, default[0])
    return getattr(cfg, key, *default)


def nearest_valid_sizes(size: int, multiple: int) -> list[int]:
    """The valid sides around `size`, nearest first (one or two of them)."""
    below = (size // multiple) * multiple
    above = below + multiple
    candidates = [s for s in (below, above) if s > 0]
    return sorted(candidates, key=lambda s: (abs(s - size), s))


def check_multiple(size: int, patch: int, merge: int, where: str, family: str, examples: str, side: str = "") -> None:
    """RecipeError unless `size` is a positive multiple of patch × merge, naming the nearest valid sides.
    `side` ("height"/"width" of an HxW size) names which side of a non-square size is wrong."""
    multiple = patch * merge
    of = f" for the {side}" if side else ""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise RecipeError(
            f"{family} image size must be a positive integer (pixels per side), got {size!r}{of}",
            where=where,
            fix=f"use a multiple of {multiple}{of}, e.g. {examples}",
        )
    if size % multiple:
        options = " or ".join(str(s) for s in nearest_valid_sizes(size, multiple))
        got = f"{side} {size}" if side else str(size)
        raise RecipeError(
            f"{family} needs image sizes that are multiples of {multiple} (patch {patch} × merge {merge}); got {got}",
            where=where,
            fix=f"use {options}{of} (nearest multiples of {multiple})",
        )


def check_fixed_size(size, patch: int, merge: int, where: str, family: str, examples: str) -> None:
    """`check_multiple` on a square side, or on each side of a (height, width) size."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise RecipeError(f"{family} image size {list(size)!r} is not height x width", where=where,
                              fix=f"use one side or HEIGHTxWIDTH, e.g. {examples}")
        for name, value in zip(("height", "width"), size):
            check_multiple(value, patch, merge, where, family, examples, side=name)
        return
    check_multiple(size, patch, merge, where, family, examples)


def grid_thw(vision_cfg: Any, image_size, family: str = "this model") -> tuple[int, int, int]:
    """(t, h, w) in patches for one image of a fixed size (a side, or (height, width)): t is 1 (an image is
    one temporal patch of 2 frames)."""
    patch = get(vision_cfg, "patch_size")
    check_fixed_size(image_size, patch, get(vision_cfg, "spatial_merge_size"), "", family, "")
    h, w = size_hw(image_size)
    return (1, h // patch, w // patch)


def num_patches(vision_cfg: Any, image_size) -> int:
    """Rows of `pixel_values` for one image."""
    t, h, w = grid_thw(vision_cfg, image_size)
    return t * h * w


def tokens_per_image(vision_cfg: Any, image_size) -> int:
    """Rows of `image_features` = `<|image_pad|>` tokens for one image (patches / merge²)."""
    return num_patches(vision_cfg, image_size) // get(vision_cfg, "spatial_merge_size") ** 2


def patch_dim(vision_cfg: Any) -> int:
    """Columns of `pixel_values`: channels × temporal patch × patch × patch (1176 at patch 14, 1536 at 16)."""
    return get(vision_cfg, "in_channels", 3) * get(vision_cfg, "temporal_patch_size") * get(vision_cfg, "patch_size") ** 2


def out_hidden_size(vision_cfg: Any) -> int:
    """Columns of `image_features`: the merger's output width (= the language model's hidden size)."""
    return get(vision_cfg, "out_hidden_size")
