"""Prompt token plumbing for images: placeholder expansion and HF's `mm_token_type_ids`.

The chat template writes one ``<|vision_start|><|image_pad|><|vision_end|>`` per image; the HF processor
replaces that single ``<|image_pad|>`` by ``grid_t * grid_h * grid_w // merge_size**2`` copies
(`Qwen2_5_VLProcessor.replace_image_token`) and then marks every image token with 1 in
`mm_token_type_ids` (`ProcessorMixin.create_mm_token_type_ids`: 0 text, 1 image, 2 video, 3 audio).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmforge.core.errors import InputError

__all__ = ["expand_image_tokens", "image_token_counts", "mm_token_type_ids"]


def image_token_counts(image_grid_thw, spatial_merge_size: int) -> list[int]:
    """Number of image tokens per image: ``t * h * w // spatial_merge_size**2`` for each grid row."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return [int(n) for n in grids.prod(axis=-1) // spatial_merge_size**2]


def expand_image_tokens(
    ids: Sequence[int],
    tokens_per_image: Sequence[int],
    image_token_id: int,
    *,
    vision_start_token_id: int | None = None,
) -> list[int]:
    """Replace the i-th single image placeholder by `tokens_per_image[i]` copies of it.

    Every occurrence of `image_token_id` is one placeholder (as in the HF processor, which replaces each
    image token of the text). With `vision_start_token_id`, each placeholder must directly follow it.
    """
    ids = [int(t) for t in ids]
    places = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(places) != len(tokens_per_image):
        raise InputError(
            f"the prompt has {len(places)} image placeholder(s) (token {image_token_id}) "
            f"but {len(tokens_per_image)} image(s) were given",
            where="vlmforge.host.prompt.expand_image_tokens",
            fix="put one <|vision_start|><|image_pad|><|vision_end|> in the prompt per image, "
            "and pass ids before expansion (each placeholder a single token)",
        )
    out: list[int] = []
    done = 0
    for i, (pos, count) in enumerate(zip(places, tokens_per_image)):
        if vision_start_token_id is not None and (pos == 0 or ids[pos - 1] != vision_start_token_id):
            raise InputError(
                f"image placeholder {i} (token index {pos}) does not follow a vision-start token "
                f"({vision_start_token_id})",
                where="vlmforge.host.prompt.expand_image_tokens",
                fix="write each image as <|vision_start|><|image_pad|><|vision_end|> in the prompt",
            )
        if int(count) < 1:
            raise InputError(
                f"image {i} would expand to {count} tokens",
                where="vlmforge.host.prompt.expand_image_tokens",
                fix="pass positive token counts (see image_token_counts)",
            )
        out.extend(ids[done:pos])
        out.extend([image_token_id] * int(count))
        done = pos + 1
    out.extend(ids[done:])
    return out


def mm_token_type_ids(input_ids, image_token_id: int, video_token_id: int | None = None) -> np.ndarray:
    """Per-token modality ids as the HF processor builds them: 1 at image tokens, 2 at video tokens, else 0.

    Computed on the (padded) ids, same shape and integer dtype as `input_ids` (int64 for lists).
    """
    ids = np.asarray(input_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        ids = ids.astype(np.int64)
    types = np.zeros_like(ids)
    types[ids == image_token_id] = 1
    if video_token_id is not None:
        types[ids == video_token_id] = 2
    return types
