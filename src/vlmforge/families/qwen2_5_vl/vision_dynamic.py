"""Qwen2.5-VL dynamic-resolution vision stage: any grid, several images of different sizes in one call.

Inputs are only `pixel_values [num_patches, C·T·P·P]` and `image_grid_thw [num_images, 3]`; the rotary
positions, the window partition (HF `get_vision_window_index`) and the per-frame full-attention segments
(HF `cu_seqlens`) are computed in the graph from them (`families.dynamic_grid`). Attention runs on padded
segment batches `[num_segments, L]` with a key-padding mask — windows (L = 64 at window 112, patch 14,
merge 2) in the windowed blocks, whole frames in the full-attention blocks — never on a dense
`[N, N]` block-diagonal mask (O(N²), measured 4.5× slower, field notes §4). The tower runs in the
processor's patch order; the windows are sets of patches, so HF's window permutation and its reverse drop
out (same features to float summation order).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlmforge.core.contracts import StageContract, TensorSpec
from vlmforge.families import dynamic_grid as G
from vlmforge.families.qwen2_5_vl import dims
from vlmforge.families.qwen2_5_vl.vision import _vision_cfg, _visual

STAGE = "vision"


class DynamicVisionForExport(nn.Module):
    """HF `Qwen2_5_VisionTransformerPretrainedModel` for any `image_grid_thw` (references, no weight copies)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        cfg = visual.config
        self.patch_embed = visual.patch_embed
        self.rotary_pos_emb = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.fullatt = frozenset(int(i) for i in visual.fullatt_block_indexes)
        self.merge = cfg.spatial_merge_size
        self.window = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.scaling = self.head_dim**-0.5

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embed.proj.weight  # [hidden, C, T, P, P]; kernel == stride
        x = pixel_values.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()
        coords = G.patch_coords(image_grid_thw, x.shape[0], self.merge)
        cos, sin = self.rotary_pos_emb(weight, torch.stack([coords.row, coords.col], dim=-1))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        layouts = {
            "window": G.window_layout(coords, self.merge, self.window, x.dtype),
            "frame": G.frame_layout(coords, x.dtype),
        }
        rope = {k: self._batched_rope(lay, cos, sin) for k, lay in layouts.items()}
        for i, blk in enumerate(self.blocks):
            kind = "frame" if i in self.fullatt else "window"
            qkv = blk.attn.qkv(blk.norm1(x))
            x = x + blk.attn.proj(self._segment_attention(qkv, layouts[kind], *rope[kind]))
            x = x + blk.mlp(blk.norm2(x))
        return self.merger(x)

    @staticmethod
    def _batched_rope(layout: G.SegmentLayout, cos: torch.Tensor, sin: torch.Tensor):
        s, length = layout.num_segments, layout.length
        shape = (s, 1, length, -1)
        return G.rows(cos, layout.gather).reshape(shape), G.rows(sin, layout.gather).reshape(shape)

    def _segment_attention(self, qkv: torch.Tensor, layout: G.SegmentLayout, cos, sin) -> torch.Tensor:
        return G.rope_segment_attention(qkv, layout, cos, sin, self.num_heads, self.head_dim, self.scaling)


def build_vision_module(hf_model) -> DynamicVisionForExport:
    return DynamicVisionForExport(_visual(hf_model)).eval()


def vision_contract(hf_config) -> StageContract:
    vcfg = _vision_cfg(hf_config)
    return StageContract(
        stage=STAGE,
        inputs=(
            TensorSpec("pixel_values", "float32", ("num_patches", dims.patch_dim(vcfg))),
            TensorSpec("image_grid_thw", "int64", ("num_images", 3)),
        ),
        outputs=(TensorSpec("image_features", "float32", ("num_image_tokens", dims.out_hidden_size(vcfg))),),
        meta={"vision": "dynamic", "merge_size": dims.get(vcfg, "spatial_merge_size")},
    )


def example_inputs(hf_config, grids=((1, 8, 12), (1, 4, 4)), seed: int = 0):
    """(pixel_values, image_grid_thw) for `grids`; values ~N(0, 1) like normalised pixels."""
    vcfg = _vision_cfg(hf_config)
    gen = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, dims.patch_dim(vcfg), generator=gen), torch.tensor(grids, dtype=torch.int64)


def export_vision(hf_model, out_path: Path) -> StageContract:
    from vlmforge.exporters.onnx_export import export_module

    module = build_vision_module(hf_model)
    contract = vision_contract(hf_model.config)
    export_module(
        module,
        example_inputs(hf_model.config),
        out_path,
        input_names=contract.input_names,
        output_names=contract.output_names,
        dynamic_shapes=G.export_dims(module.merge),
        stage="qwen2_5_vl/vision_dynamic",
        contract=contract,
    )
    return contract


def stage_contract(hf_config, options) -> StageContract:
    """The StageSpec hook of a vision=dynamic build (FamilySpec.dynamic_vision): no option shapes the graph."""
    return vision_contract(hf_config)


def stage_export(hf_model, options, out_path: Path) -> StageContract:
    """The StageSpec hook of a vision=dynamic build (FamilySpec.dynamic_vision): no option shapes the graph."""
    return export_vision(hf_model, out_path)
