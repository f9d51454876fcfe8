"""Qwen3-VL fixed-size vision dims: which image sides are valid, what they turn into, which DeepStack layers.

Pure functions on plain ints and on any vision config (an HF `Qwen3VLVisionConfig` or a plain dict from
`config.json`) with `patch_size`, `spatial_merge_size`, `temporal_patch_size`, `in_channels`, `depth` and
`deepstack_visual_indexes` (no torch import). A fixed-size vision graph only exists for sides that are
multiples of patch × merge: the ViT cuts 16-px patches and the merger folds 2×2 of them into one
language-model token, so anything else cannot be tiled (field notes §3: 384 → grid 24×24, 144 tokens).
"""

from __future__ import annotations

from typing import Any

from vlmforge.errors import CheckpointError, RecipeError

PATCH_SIZE = 16
SPATIAL_MERGE_SIZE = 2
PATCH_MULTIPLE = PATCH_SIZE * SPATIAL_MERGE_SIZE  # 32


def check_image_size(size: int, where: str = "") -> None:
    """Raise RecipeError unless `size` is a positive multiple of 32 (patch 16 × merge 2)."""
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
    """Columns of `pixel_values`: channels × temporal patch × patch × patch (3·2·16·16 = 1536)."""
    return (
        _get(vision_cfg, "in_channels", 3)
        * _get(vision_cfg, "temporal_patch_size")
        * _get(vision_cfg, "patch_size") ** 2
    )


def deepstack_layers(vision_cfg: Any) -> list[int]:
    """The ViT blocks whose outputs feed DeepStack, in the order the decoder consumes them.

    That is block order, not config order: HF appends a feature as each listed block is passed (the
    merger used is the one at the block's position in the config list), and decoder layer i adds feature i.
    """
    return sorted(int(i) for i in (_get(vision_cfg, "deepstack_visual_indexes", None) or []))


def check_deepstack_indexes(vision_cfg: Any, where: str = "") -> None:
    """Raise CheckpointError when a DeepStack index does not name a ViT block (0 <= i < depth).

    HF only tests `layer_num in deepstack_visual_indexes`, so an out-of-range index is silently never
    hit and the model runs with fewer DeepStack features than it has mergers for.
    """
    depth = int(_get(vision_cfg, "depth"))
    indexes = [int(i) for i in (_get(vision_cfg, "deepstack_visual_indexes", None) or [])]
    bad = [i for i in indexes if not 0 <= i < depth]
    if bad:
        raise CheckpointError(
            f"Qwen3-VL vision_config.deepstack_visual_indexes {indexes} has {bad} outside the "
            f"{depth} ViT blocks (valid: 0..{depth - 1})",
            where=where,
            fix="use a checkpoint whose config.json names existing blocks (or fix vision_config.depth)",
        )
    if len(set(indexes)) != len(indexes):
        raise CheckpointError(
            f"Qwen3-VL vision_config.deepstack_visual_indexes {indexes} repeats a block",
            where=where,
            fix="use a checkpoint whose config.json lists each DeepStack block once",
        )


def _get(cfg: Any, key: str, *default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg[key] if not default else cfg.get(key, default[0])
    return getattr(cfg, key, *default)


def _check_multiple(size: int, patch: int, merge: int, where: str) -> None:
    multiple = patch * merge
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise RecipeError(
            f"Qwen3-VL image size must be a positive integer (pixels per side), got {size!r}",
            where=where,
            fix=f"use a multiple of {multiple}, e.g. 384 or 672",
        )
    if size % multiple:
        near = nearest_valid_sizes(size, multiple)
        options = " or ".join(str(s) for s in near)
        raise RecipeError(
            f"Qwen3-VL needs image sizes that are multiples of {multiple} (patch {patch} × merge {merge}); "
            f"got {size}",
            where=where,
            fix=f"use {options} (nearest multiples of {multiple})",
        )
