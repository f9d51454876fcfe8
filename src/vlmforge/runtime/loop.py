"""The generation loop over an `Engine`: prefill (vision -> embedding -> decoder), then decode steps.

Shared by the chain validator and the user-facing runtime, so the validated loop is the shipped loop:
both go through `prefill` / `DecodeState.step`, whose decoder runs on the IOBinding KV cache of
`vlmforge.runtime.kv` (no per-token reallocation or host copies of the cache).

Batches are left-padded (the padding side generation uses); positions come from `mrope.rope_index`
with the attention mask at prefill and `mrope.decode_position_ids(attention_mask=...)` afterwards.
Long prompts are prefilled in chunks of `prefill_chunk` tokens (exact: each chunk attends to the cache
of the previous ones), which bounds the prefill logits buffer to ``B * chunk * vocab``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from vlmforge.host import mrope
from vlmforge.host.tokens import left_pad
from vlmforge.runtime.engine import Engine
from vlmforge.runtime.kv import BoundDecoder

PREFILL_CHUNK = 512


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


@dataclass
class GenerationStats:
    """Wall-clock facts of one generate call (seconds). `ttft_s` counts from the call to the first token."""

    batch: int = 1
    prompt_tokens: int = 0
    images: int = 0
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    new_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps per second, all rows counted (0 when nothing was decoded)."""
        return self.decode_steps * self.batch / self.decode_s if self.decode_s > 0 else 0.0

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        return out


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


class DecodeState:
    """The KV cache and masks of one (batched) generation after prefill; `logits` are the last position's."""

    def __init__(self, engine: Engine, decoder: BoundDecoder, mask: np.ndarray, deltas: np.ndarray,
                 logits: np.ndarray, stats: GenerationStats) -> None:
        self.engine = engine
        self.decoder = decoder
        # The attention mask lives in one buffer at the cache's capacity; `mask` is the view of the
        # columns so far (a contiguous one for batch 1, bound to the decoder without a copy).
        self._mask_buf = np.zeros((mask.shape[0], max(decoder.capacity, mask.shape[1])), np.int64)
        self._mask_buf[:, :mask.shape[1]] = mask
        self.mask = self._mask_buf[:, :mask.shape[1]]
        self.deltas = deltas
        self.logits = logits  # [B, V] float32
        self.stats = stats
        # Position of the next token per row: attended tokens so far + rope delta; the same value
        # `mrope.decode_position_ids(attention_mask=...)` computes from the cumulative sum of the mask.
        self._next_position = mask.sum(axis=1, keepdims=True).astype(np.int64) + deltas

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def step(self, tokens) -> np.ndarray:
        """Feed one token per row; returns (and keeps) the new last-position logits [B, V]."""
        t = time.perf_counter()
        n = self.mask.shape[1]
        if n < self._mask_buf.shape[1]:
            self._mask_buf[:, n] = 1
            self.mask = self._mask_buf[:, :n + 1]
        else:  # past the capacity: the decoder refuses the step with a clear error
            self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), np.int64)], 1)
        positions = self._next_position[None]  # [1, B, 1]: broadcast to the 3 MRoPE axes by the decoder
        self._next_position = self._next_position + 1
        logits = self.decoder.decode(tokens, self.mask, positions)
        self.logits = logits[:, -1].astype(np.float32)
        self.stats.decode_s += time.perf_counter() - t
        self.stats.decode_steps += 1
        return self.logits


def prefill(
    engine: Engine,
    prompts: Sequence[PromptInputs],
    ids: TokenIds,
    *,
    max_new_tokens: int,
    pad_id: int = 0,
    kv_mode: str = "preallocated",
    device: str = "cpu",
    prefill_chunk: int = PREFILL_CHUNK,
    stats: GenerationStats | None = None,
) -> DecodeState:
    """Vision for every image (batch-major order), embedding, decoder prefill; the cache is sized for
    prompt + `max_new_tokens` once, here."""
    stats = stats if stats is not None else GenerationStats()
    rows = [np.asarray(p.input_ids, np.int64).reshape(-1) for p in prompts]
    input_ids, mask = left_pad(rows, pad_id)
    stats.batch, stats.prompt_tokens = len(rows), int(mask.sum())
    images = [img for p in prompts for img in p.images]
    t = time.perf_counter()
    features, deepstack, grids = encode_images(engine, images)
    stats.images = len(images)
    if images:
        stats.vision_s += time.perf_counter() - t
    t = time.perf_counter()
    embeds, deep_embeds = engine.embed(input_ids, features, deepstack)
    positions, deltas = mrope.rope_index(
        input_ids, mask, grids, image_token_id=ids.image, vision_start_token_id=ids.vision_start,
        spatial_merge_size=ids.merge_size,
    )
    seq = input_ids.shape[1]
    decoder = BoundDecoder(engine.decoder, engine.layout, batch=len(rows), capacity=seq + max(max_new_tokens, 0),
                           mode=kv_mode, device=device, embedding=engine.embedding)
    chunk = max(int(prefill_chunk), 1)
    for a in range(0, seq, chunk):
        b = min(seq, a + chunk)
        ds = deep_embeds[:, :, a:b] if deep_embeds is not None else None
        logits = decoder.run(embeds[:, a:b], mask[:, :b], positions[:, :, a:b], ds)
    last = logits[:, -1].astype(np.float32)
    stats.prefill_s += time.perf_counter() - t
    return DecodeState(engine, decoder, mask, deltas, last, stats)


def decode_steps(state: DecodeState, *, max_new_tokens: int, select: Callable[[np.ndarray, int], np.ndarray]) -> Iterator[np.ndarray]:
    """Yield the tokens [B] `select(scores [B, V], step)` picks at each step; stop by closing the iterator.

    The state advances (one decoder step) only when the next token is asked for, so a consumer that
    stops after the last token it needs never pays for an extra step.
    """
    for step in range(max_new_tokens):
        tokens = np.asarray(select(state.logits, step), np.int64).reshape(-1)
        yield tokens
        if step + 1 == max_new_tokens:
            return
        state.step(tokens)


def generate_tokens(
    engine: Engine,
    prompt: PromptInputs,
    ids: TokenIds,
    *,
    max_new_tokens: int,
    choose: Callable[[np.ndarray, list[int]], int],
    min_new_tokens: int = 0,
    kv_mode: str = "preallocated",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (token, raw last-position logits [V]) per step; stops at EOS (after min_new_tokens) or the limit."""
    state = prefill(engine, [prompt], ids, max_new_tokens=max_new_tokens, kv_mode=kv_mode)
    generated: list[int] = []
    for step in range(max_new_tokens):
        raw = state.logits[0].copy()
        scored = raw.copy()
        if step < min_new_tokens:
            scored[list(ids.eos)] = -np.inf
        token = int(choose(scored, generated))
        generated.append(token)
        yield token, raw
        if token in ids.eos or step + 1 == max_new_tokens:
            return
        state.step([token])


def greedy(scores: np.ndarray, generated: list[int]) -> int:
    return int(np.argmax(scores))
