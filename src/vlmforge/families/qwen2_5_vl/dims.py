"""Qwen2.5-VL fixed-size vision dims: which image sides are valid and what they turn into.

Pure functions on plain ints and on any vision config (an HF `Qwen2_5_VLVisionConfig` or a plain dict
from `config.json`) with `patch_size`, `spatial_merge_size`, `temporal_patch_size` and `in_channels`
(no torch import). A fixed-size vision graph
only exists for sides that are multiples of patch × merge: the ViT cuts 14-px patches and the merger folds
2×2 of them into one language-model token, so anything else cannot be tiled (field notes §3).
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


PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
PATCH_MULTIPLE = PATCH_SIZE * SPATIAL_MERGE_SIZE  # 28


def check_image_size(size, where: str = "") -> None:
    """Raise RecipeError unless `size` (a side, or (height, width)) has sides that are positive multiples of
    28 (patch 14 × merge 2)."""
    check_fixed_size(size, PATCH_SIZE, SPATIAL_MERGE_SIZE, where, "Qwen2.5-VL", "392 or 672")


def deepstack_layer_count(hf_config: Any) -> int:
    """The FamilySpec hook: Qwen2.5-VL has no DeepStack."""
    return 0


def check_checkpoint_config(hf_config: Any, where: str = "") -> None:
    """The FamilySpec hook: nothing in a Qwen2.5-VL config that HF accepts is known to run wrong."""
