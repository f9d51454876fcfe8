"""3-D MRoPE position ids (temporal, height, width) for Qwen2.5-VL / Qwen3-VL, in numpy.

A port of transformers 5.23 `Qwen2_5_VLModel.get_rope_index` / `Qwen3VLModel.get_rope_index` for images
(videos are not supported by vlmforge's runtime). Both families compute identical ids for images: text
tokens advance all three axes by one; an image of merged grid (t, h, w) starting at position p gets
t-ids ``p + arange(t)``, h-ids ``p + row`` and w-ids ``p + col``, and the text after it resumes at
``p + max(h, w)``. The families differ only for videos (Qwen2.5-VL scales the temporal axis by
``tokens_per_second * second_per_grid_ts``; Qwen3-VL splits a video into one grid per frame and separates
frames with timestamp text); since vlmforge handles images only, nothing here depends on the family. Video
support would add the scheme as a FamilySpec fact and an argument here.

HF finds the images through `mm_token_type_ids` (runs of image tokens), not through the vision-start
token; this module does the same and additionally requires every image run to sit right after a
vision-start token, so that it also agrees with ports that locate images by the vision-start token
(onnxruntime-genai, transformers 4.x).

Decode steps: HF offsets plain 1-D positions by the per-row `rope_deltas` that prefill returned
(``position = cumsum(attention_mask) - 1 + rope_delta``; the model's cached forward). transformers 5
`generate` instead continues each axis from its own last prefill value (+1 per step); the two agree
whenever the prompt ends with a text token (every chat prompt does) and differ only if it ends inside an
image, where this module follows the model's forward (as onnxruntime-genai and transformers 4.x do).
"""

from __future__ import annotations

import numpy as np

from vlmforge.core.errors import InputError

__all__ = ["decode_position_ids", "rope_index"]


def rope_index(
    input_ids,
    attention_mask,
    image_grid_thw,
    *,
    image_token_id: int,
    vision_start_token_id: int | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Prefill position ids ``[3, B, S]`` and ``rope_deltas [B, 1]`` (both int64), as HF `get_rope_index`.

    `attention_mask` may be None (no padding); padded positions get position 0, as in HF. Images are
    consumed from `image_grid_thw` (``[n_images, 3]``, patch grid before merging) in batch-major order.
    `vision_start_token_id=None` skips the check that each image follows a vision-start token.
    """
    ids = _as_2d_int(input_ids, "input_ids")
    mask = _mask_or_ones(attention_mask, ids.shape)
    grids = _grids(image_grid_thw)
    batch, seq = ids.shape
    position_ids = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    next_image = 0
    for row in range(batch):
        valid = mask[row]
        row_ids = ids[row][valid]
        if row_ids.size == 0:
            raise InputError(
                f"batch row {row} has no attended token (attention_mask is all zeros)",
                where="vlmforge.host.mrope.rope_index",
                fix="drop empty prompts from the batch before prefill",
            )
        positions, next_image = _row_positions(
            row_ids, grids, next_image, row, image_token_id, vision_start_token_id, spatial_merge_size
        )
        position_ids[:, row, valid] = positions
        deltas[row, 0] = positions.max() + 1 - row_ids.size
    if next_image != len(grids):
        raise InputError(
            f"image_grid_thw has {len(grids)} images but input_ids hold {next_image} image-token runs",
            where="vlmforge.host.mrope.rope_index",
            fix="expand one <|image_pad|> placeholder per image (vlmforge.host.prompt.expand_image_tokens)",
        )
    return position_ids, deltas


def decode_position_ids(
    rope_deltas,
    *,
    attention_mask=None,
    past_len: int | None = None,
    new_tokens: int = 1,
) -> np.ndarray:
    """Position ids ``[3, B, new_tokens]`` for tokens appended after prefill, as HF does on decode steps.

    Give either `attention_mask` ``[B, past + new_tokens]`` (the full mask including the new tokens; left
    padding is handled through its cumulative sum) or `past_len` (no padding anywhere).
    """
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    if new_tokens < 1:
        raise InputError(
            f"new_tokens must be >= 1, got {new_tokens}",
            where="vlmforge.host.mrope.decode_position_ids",
            fix="pass the number of tokens fed to this decode step",
        )
    if (attention_mask is None) == (past_len is None):
        raise InputError(
            "decode_position_ids needs exactly one of attention_mask and past_len",
            where="vlmforge.host.mrope.decode_position_ids",
            fix="pass attention_mask when the batch is padded, else past_len",
        )
    if attention_mask is not None:
        mask = np.asarray(attention_mask).astype(np.int64)
        if mask.ndim != 2 or mask.shape[0] != deltas.shape[0] or mask.shape[1] < new_tokens:
            raise InputError(
                f"attention_mask has shape {mask.shape}; expected [B={deltas.shape[0]}, past + {new_tokens}]",
                where="vlmforge.host.mrope.decode_position_ids",
                fix="pass the full attention mask, including the columns of the new tokens",
            )
        pos = np.cumsum(mask, axis=-1) - 1
        pos = np.where(mask == 0, 0, pos)[:, -new_tokens:]
    else:
        if past_len < 0:
            raise InputError(
                f"past_len must be >= 0, got {past_len}",
                where="vlmforge.host.mrope.decode_position_ids",
                fix="pass the number of tokens already in the KV cache",
            )
        pos = np.broadcast_to(np.arange(past_len, past_len + new_tokens, dtype=np.int64), (deltas.shape[0], new_tokens))
    return np.broadcast_to((pos + deltas)[None], (3, deltas.shape[0], new_tokens)).copy()


def _row_positions(row_ids, grids, next_image, row, image_token_id, vision_start_token_id, merge):
    """Positions [3, n] of one unpadded row; returns them and the index of the next unused image grid."""
    n = row_ids.size
    out = np.empty((3, n), dtype=np.int64)
    cur = 0  # next position id
    done = 0  # tokens of the row already placed
    for start, end in _image_runs(row_ids == image_token_id):
        text = start - done
        out[:, done:start] = cur + np.arange(text, dtype=np.int64)
        cur += text
        if vision_start_token_id is not None and (start == 0 or row_ids[start - 1] != vision_start_token_id):
            raise InputError(
                f"batch row {row}: image tokens at {start}..{end - 1} do not follow a vision-start token "
                f"({vision_start_token_id})",
                where="vlmforge.host.mrope.rope_index",
                fix="build prompts as <|vision_start|><|image_pad|>*N<|vision_end|> (one run per image)",
            )
        if next_image >= len(grids):
            raise InputError(
                f"input_ids hold more image-token runs than the {len(grids)} images in image_grid_thw "
                f"(batch row {row}, tokens {start}..{end - 1})",
                where="vlmforge.host.mrope.rope_index",
                fix="pass one image_grid_thw row per image, in prompt order",
            )
        out[:, start:end], advance = _image_positions(grids[next_image], cur, end - start, merge, next_image)
        cur += advance
        done = end
        next_image += 1
    out[:, done:] = cur + np.arange(n - done, dtype=np.int64)
    return out, next_image


def _image_positions(grid, start, n_tokens, merge, index):
    """[3, t*h*w/merge**2] ids of one image and how far the next position advances (HF: max(h, w) // merge)."""
    t, h, w = (int(v) for v in grid)
    lt, lh, lw = t, h // merge, w // merge
    if lt * lh * lw != n_tokens:
        raise InputError(
            f"image {index} has grid (t={t}, h={h}, w={w}) -> {lt * lh * lw} tokens after merge {merge}, "
            f"but its run of image tokens is {n_tokens} long",
            where="vlmforge.host.mrope.rope_index",
            fix="expand each placeholder to grid_t*grid_h*grid_w // spatial_merge_size**2 image tokens",
        )
    tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
    ids = np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + start
    return ids, max(h, w) // merge


def _image_runs(is_image: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _as_2d_int(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(
            f"{name} must be a 2-D integer array [batch, seq], got shape {arr.shape} dtype {arr.dtype}",
            where="vlmforge.host.mrope.rope_index",
            fix=f"pass {name} as np.int64 of shape [batch, seq]",
        )
    return arr.astype(np.int64, copy=False)


def _mask_or_ones(attention_mask, shape) -> np.ndarray:
    if attention_mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise InputError(
            f"attention_mask has shape {mask.shape}, input_ids {shape}",
            where="vlmforge.host.mrope.rope_index",
            fix="pass an attention mask of the same shape as input_ids",
        )
    return mask.astype(bool)


def _grids(image_grid_thw) -> np.ndarray:
    if image_grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    grids = np.asarray(image_grid_thw, dtype=np.int64)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise InputError(
            f"image_grid_thw must have shape [n_images, 3], got {grids.shape}",
            where="vlmforge.host.mrope.rope_index",
            fix="pass one (t, h, w) patch grid per image, as the image preprocessor returns it",
        )
    return grids
