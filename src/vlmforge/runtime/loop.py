"""The generation loop over an `Engine`: prefill (vision -> embedding -> decoder), then decode steps.

Shared by the chain validator and the user-facing runtime, so the validated loop is the shipped loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from vlmforge.runtime import mrope
from vlmforge.runtime.engine import Engine


@dataclass(frozen=True)
class PromptInputs:
    """One prompt: expanded ids [S] and per-image (pixel_values, grid_thw)."""

    input_ids: np.ndarray
    images: tuple[tuple[np.ndarray, np.ndarray], ...] = ()


@dataclass(frozen=True)
class TokenIds:
    image: int
    vision_start: int
    eos: tuple[int, ...]
    merge_size: int
    family: str


def encode_images(engine: Engine, images) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Run the vision graph once per image (fixed-shape graph), concatenating the features."""
    feats, deep, grids = [], [], []
    for pixel_values, grid in images:
        f, d = engine.encode_image(pixel_values, grid)
        feats.append(f)
        if d is not None:
            deep.append(d)
        grids.append(np.asarray(grid).reshape(1, 3))
    if not feats:
        return None, None, np.zeros((0, 3), np.int64)
    return (
        np.concatenate(feats, 0),
        np.concatenate(deep, 1) if deep else None,
        np.concatenate(grids, 0).astype(np.int64),
    )


def generate_tokens(
    engine: Engine,
    prompt: PromptInputs,
    ids: TokenIds,
    *,
    max_new_tokens: int,
    choose: Callable[[np.ndarray, list[int]], int],
    min_new_tokens: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (token, raw last-position logits [V]) per step; stops at EOS (after min_new_tokens) or the limit."""
    input_ids = np.asarray(prompt.input_ids, np.int64).reshape(1, -1)
    features, deepstack, grids = encode_images(engine, prompt.images)
    embeds, deep_embeds = engine.embed(input_ids, features, deepstack)
    positions, deltas = mrope.rope_index(
        input_ids, None, grids, image_token_id=ids.image, vision_start_token_id=ids.vision_start,
        spatial_merge_size=ids.merge_size, family=ids.family,
    )
    mask = np.ones_like(input_ids)
    logits, past = engine.decode(embeds, mask, positions, engine.empty_past(1), deep_embeds)
    generated: list[int] = []
    for step in range(max_new_tokens):
        raw = logits[0, -1].astype(np.float32)
        scored = raw.copy()
        if step < min_new_tokens:
            scored[list(ids.eos)] = -np.inf
        token = int(choose(scored, generated))
        generated.append(token)
        yield token, raw
        if token in ids.eos or step + 1 == max_new_tokens:
            return
        next_ids = np.array([[token]], np.int64)
        embeds, deep_embeds = engine.embed(next_ids, None, None)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        positions = mrope.decode_position_ids(deltas, past_len=mask.shape[1] - 1, new_tokens=1)
        logits, past = engine.decode(embeds, mask, positions, past, None)


def greedy(scores: np.ndarray, generated: list[int]) -> int:
    return int(np.argmax(scores))
