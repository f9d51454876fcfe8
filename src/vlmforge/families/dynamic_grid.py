"""In-graph grid arithmetic for the dynamic-resolution vision stages (torch ops that torch.onnx traces).

A dynamic vision graph takes only `pixel_values [num_patches, C·T·P·P]` and `image_grid_thw [num_images, 3]`
(what onnxruntime-genai feeds), so everything HF derives from `grid_thw` with `.tolist()` loops (position
ids, window index, `cu_seqlens`, interpolation taps) is computed here per patch, vectorised over all images:

- `patch_coords`: for every row of `pixel_values` (in the processor's merge-block order), its image, frame,
  (row, col) in patches, and the image's grid — shapes depend only on `num_patches` and `num_images`;
- `segment_layout`: a batched layout for attention inside segments (Qwen2.5-VL windows, or whole frames):
  segment `s` occupies slots `s*L .. s*L+L-1` of a padded `[num_segments, L]` batch; `gather` fills the
  batch from the patch sequence (padding slots repeat patch 0 and are masked as keys), `scatter` reads each
  patch back. The number of segments (and, for frames, L) is a data-dependent size: `.item()` gives torch
  an unbacked size that the exporter turns into shape arithmetic on the input values.

Attention inside a segment does not depend on the order of its patches (RoPE travels with each patch), so
the tower can run in the processor's patch order instead of HF's window order: the results agree to float
summation order (~1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PatchCoords:
    image: torch.Tensor  # [N] image of each patch
    frame: torch.Tensor  # [N] frame within its image (0 for images)
    row: torch.Tensor  # [N] patch row within its frame
    col: torch.Tensor  # [N] patch column within its frame
    within: torch.Tensor  # [N] index within its frame (merge-block order)
    t: torch.Tensor  # [I] grid of each image
    h: torch.Tensor
    w: torch.Tensor


def export_dims(merge: int) -> dict:
    """torch.export dynamic shapes of a dynamic vision graph's inputs: `pixel_values` rows come in whole
    merge units (merge x merge patches), and any number of images."""
    units = torch.export.Dim("num_merge_units", min=1)
    return {"pixel_values": {0: merge**2 * units}, "image_grid_thw": {0: torch.export.Dim("num_images", min=1)}}


def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[index]` along dim 0 as one ONNX Gather (tensor indexing exports as GatherND plus a
    negative-index fix-up); `index` is always in range here."""
    return torch.index_select(x, 0, index)


def patch_coords(grid_thw: torch.Tensor, num_patches: int, merge: int) -> PatchCoords:
    """Per-patch coordinates, the inverse of the processor's (block_row, block_col, in_row, in_col) order.

    Same decoding as HF's `get_vision_interpolation_indices_and_weights`, with the image of each patch found
    by comparison against the cumulative patch counts (no `repeat_interleave`: its output size is
    data-dependent). A patch beyond the grid's total is assigned to the last image (no out-of-range gather);
    the host checks the pair beforehand (`vlmforge.host.dynamic.check_grid`).
    """
    grid = grid_thw.to(torch.int64)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    counts = t * h * w
    ends = torch.cumsum(counts, 0)
    p = torch.arange(num_patches, dtype=torch.int64, device=grid.device)
    image = (p[:, None] >= ends[None, :]).to(torch.int64).sum(1).clamp(max=grid.shape[0] - 1)
    local = p - rows(ends - counts, image)
    hw = rows(h * w, image)
    frame, within = local // hw, local % hw
    blocks_w = rows(w, image) // merge
    in_col, in_row = within % merge, (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    return PatchCoords(image, frame, block_row * merge + in_row, block_col * merge + in_col, within, t, h, w)


@dataclass
class SegmentLayout:
    gather: torch.Tensor  # [S*L] patch index filling each batch slot (0 for padding)
    scatter: torch.Tensor  # [N] batch slot of each patch
    key_mask: torch.Tensor  # [S, 1, L, 1] additive key bias: 0 on real patches, finfo.min on padding
    num_segments: int  # S (unbacked in the exported graph)
    length: int  # L


def segment_layout(segment: torch.Tensor, position: torch.Tensor, num_segments, length, dtype) -> SegmentLayout:
    """Batched layout for segment `segment[p]`, slot `position[p]` (< length) of every patch p."""
    n = segment.shape[0]
    slot = segment * length + position
    total = num_segments * length
    gather = torch.zeros(total, dtype=torch.int64, device=segment.device)
    gather = gather.scatter(0, slot, torch.arange(n, dtype=torch.int64, device=segment.device))
    valid = torch.zeros(total, dtype=torch.bool, device=segment.device)
    valid = valid.scatter(0, slot, torch.ones_like(slot, dtype=torch.bool))
    mask = torch.zeros(total, dtype=dtype, device=segment.device).masked_fill(~valid, torch.finfo(dtype).min)
    return SegmentLayout(gather, slot, mask.reshape(num_segments, 1, length, 1), num_segments, length)


def _size(value: torch.Tensor) -> int:
    """A data-dependent size as a Python int (an unbacked SymInt under export)."""
    size = value.item()
    torch._check(size > 0)
    return size


def frame_layout(coords: PatchCoords, dtype) -> SegmentLayout:
    """One segment per frame of every image (HF `cu_seqlens`: full attention within a frame)."""
    frame_start = torch.cumsum(coords.t, 0) - coords.t
    segment = rows(frame_start, coords.image) + coords.frame
    num_segments = _size(coords.t.sum())
    length = _size((coords.h * coords.w).max())
    return segment_layout(segment, coords.within, num_segments, length, dtype)


def window_layout(coords: PatchCoords, merge: int, window: int, dtype) -> SegmentLayout:
    """Qwen2.5-VL windows: `window` × `window` merged tokens per window (HF `get_vision_window_index`).

    HF pads each frame's merged grid up to a multiple of the window and drops the empty windows
    (`unique_consecutive` of `cu_window_seqlens`); ceil-division gives the same non-empty windows.
    """
    mh, mw = coords.h // merge, coords.w // merge
    nwh, nww = (mh + window - 1) // window, (mw + window - 1) // window
    per_frame = nwh * nww
    per_image = coords.t * per_frame
    image_start = torch.cumsum(per_image, 0) - per_image
    img = coords.image
    br, bc = coords.row // merge, coords.col // merge
    window_in_frame = (br // window) * rows(nww, img) + bc // window
    segment = rows(image_start, img) + coords.frame * rows(per_frame, img) + window_in_frame
    unit = (br % window) * window + bc % window
    position = unit * merge * merge + (coords.row % merge) * merge + coords.col % merge
    num_segments = _size(per_image.sum())
    return segment_layout(segment, position, num_segments, window * window * merge * merge, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_segment_attention(qkv: torch.Tensor, layout: SegmentLayout, cos, sin, num_heads: int, head_dim: int,
                           scaling: float) -> torch.Tensor:
    """Self-attention with 2-D RoPE inside each segment (a window or a frame); qkv [N, 3C] -> [N, C], in the
    patches' own order (before the block's `proj`). `cos`/`sin` are already gathered per segment."""
    s, length = layout.num_segments, layout.length
    batched = rows(qkv, layout.gather).reshape(s, length, 3, num_heads, head_dim)
    q, k, v = batched.permute(2, 0, 3, 1, 4).unbind(0)  # [S, H, L, D]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    out = segment_attention(q, k, v, layout, scaling)  # [S, H, L, D]
    return rows(out.transpose(1, 2).reshape(s * length, -1), layout.scatter)


def segment_attention(q, k, v, layout: SegmentLayout, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling + key bias) v on [S, H, L, D], the key bias folded into the product.

    q gets a column of ones and k the key-padding bias as one more column, so the product carries the mask:
    an explicit Add over the [S, H, L, L] scores cost onnxruntime as much as the attention MatMuls
    themselves (measured: +250 ms of 755 at 672 px on the tiny tower); the extra column costs 1/D more
    MatMul. Real keys get a bias of exactly 0, so their scores are unchanged.
    """
    s, h, length, _ = q.shape
    q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
    k = torch.cat([k, layout.key_mask.expand(s, h, length, 1)], dim=-1)
    scores = (q @ k.transpose(-1, -2)) * scaling
    return torch.softmax(scores, dim=-1) @ v
