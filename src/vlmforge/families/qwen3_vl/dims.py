"""Qwen3-VL fixed-size vision dims: which image sides are valid, what they turn into, which DeepStack layers.

Pure functions on plain ints and on any vision config (an HF `Qwen3VLVisionConfig` or a plain dict from
`config.json`) with `patch_size`, `spatial_merge_size`, `temporal_patch_size`, `in_channels`, `depth` and
`deepstack_visual_indexes` (no torch import). A fixed-size vision graph only exists for sides that are
multiples of patch × merge: the ViT cuts 16-px patches and the merger folds 2×2 of them into one
language-model token, so anything else cannot be tiled (field notes §3: 384 → grid 24×24, 144 tokens).
"""

from __future__ import annotations

from typing import Any

from vlmforge.families.grid import (  # noqa: F401  (the grid math is shared; re-exported for this family)
    get,
    grid_thw,
    nearest_valid_sizes,
    num_patches,
    out_hidden_size,
    patch_dim,
    tokens_per_image,
)
from vlmforge.families.grid import check_fixed_size
from vlmforge.core.errors import CheckpointError

PATCH_SIZE = 16
SPATIAL_MERGE_SIZE = 2
PATCH_MULTIPLE = PATCH_SIZE * SPATIAL_MERGE_SIZE  # 32


def check_image_size(size, where: str = "") -> None:
    """Raise RecipeError unless `size` (a side, or (height, width)) has sides that are positive multiples of
    32 (patch 16 × merge 2)."""
    check_fixed_size(size, PATCH_SIZE, SPATIAL_MERGE_SIZE, where, "Qwen3-VL", "384 or 672")


def deepstack_layers(vision_cfg: Any) -> list[int]:
    """The ViT blocks whose outputs feed DeepStack, in the order the decoder consumes them.

    That is block order, not config order: HF appends a feature as each listed block is passed (the
    merger used is the one at the block's position in the config list), and decoder layer i adds feature i.
    """
    return sorted(int(i) for i in (get(vision_cfg, "deepstack_visual_indexes", None) or []))


def check_deepstack_indexes(vision_cfg: Any, where: str = "") -> None:
    """Raise CheckpointError when a DeepStack index does not name a ViT block (0 <= i < depth).

    HF only tests `layer_num in deepstack_visual_indexes`, so an out-of-range index is silently never
    hit and the model runs with fewer DeepStack features than it has mergers for.
    """
    depth = int(get(vision_cfg, "depth"))
    indexes = [int(i) for i in (get(vision_cfg, "deepstack_visual_indexes", None) or [])]
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


def deepstack_layer_count(hf_config: Any) -> int:
    """The FamilySpec hook: how many DeepStack features the checkpoint's vision tower produces."""
    return len(get(hf_config.vision_config, "deepstack_visual_indexes", None) or [])


def check_checkpoint_config(hf_config: Any, where: str = "") -> None:
    """The FamilySpec hook: refuse configs HF would run silently wrong (DeepStack indexes)."""
    check_deepstack_indexes(hf_config.vision_config, where)
