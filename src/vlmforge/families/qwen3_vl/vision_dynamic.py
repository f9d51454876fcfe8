"""Qwen3-VL dynamic-resolution vision stage: any grid, several images of different sizes in one call.

Inputs are only `pixel_values [num_patches, C·T·P·P]` and `image_grid_thw [num_images, 3]`; the learned
position table's bilinear resampling to each image's grid (HF `get_vision_interpolation_indices_and_weights`,
which replaced `fast_pos_embed_interpolate`), the rotary positions and the per-frame attention segments
(HF `cu_seqlens`) are computed in the graph from them (`families.dynamic_grid`). Attention runs on a padded
`[num_frames, max_frame_len]` batch with a key-padding mask: one image is one unpadded segment, several
images cost their padding to the largest, never a dense `[N, N]` block-diagonal mask.

Outputs: `image_features [num_tokens, out_hidden]` and, unless `deepstack=False`,
`deepstack_features [num_deepstack, num_tokens, out_hidden]` in block order (as the fixed stage).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vlmforge.core.contracts import StageContract, TensorSpec
from vlmforge.core.errors import ExportError
from vlmforge.families import dynamic_grid as G
from vlmforge.families.qwen3_vl import dims
from vlmforge.families.qwen3_vl.vision import _vision_cfg, _visual

STAGE = "vision"


class DynamicVisionForExport(nn.Module):
    """HF `Qwen3VLVisionModel` for any `image_grid_thw` (references to its modules, no weight copies)."""

    def __init__(self, visual: nn.Module, deepstack: bool = True) -> None:
        super().__init__()
        cfg = visual.config
        _check_interpolation(visual)
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.rotary_pos_emb = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.side = visual.num_grid_per_side
        self.merge = cfg.spatial_merge_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.scaling = self.head_dim**-0.5
        order = [int(i) for i in visual.deepstack_visual_indexes]
        self.deepstack_layers = dims.deepstack_layers(cfg) if deepstack else []
        self.deepstack_mergers = nn.ModuleList(
            [visual.deepstack_merger_list[order.index(i)] for i in self.deepstack_layers]
        ) if deepstack else None

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        weight = self.patch_embed.proj.weight  # [hidden, C, T, P, P]; kernel == stride
        x = F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.patch_embed.proj.bias)
        coords = G.patch_coords(image_grid_thw, x.shape[0], self.merge)
        indices, weights = interpolation_taps(coords, self.side)
        x = x + (self.pos_embed(indices) * weights[:, :, None]).sum(1).to(x.dtype)
        cos, sin = self.rotary_pos_emb(weight, torch.stack([coords.row, coords.col], dim=-1))
        layout = G.frame_layout(coords, x.dtype)
        shape = (layout.num_segments, 1, layout.length, -1)
        cos = G.rows(cos.to(x.dtype), layout.gather).reshape(shape)
        sin = G.rows(sin.to(x.dtype), layout.gather).reshape(shape)
        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = x + blk.attn.proj(self._segment_attention(blk.attn.qkv(blk.norm1(x)), layout, cos, sin))
            x = x + blk.mlp(blk.norm2(x))
            if i in self.deepstack_layers:
                deepstack.append(self.deepstack_mergers[self.deepstack_layers.index(i)](x))
        features = self.merger(x)
        if self.deepstack_mergers is None:
            return (features,)
        return features, torch.stack(deepstack, dim=0)

    def _segment_attention(self, qkv: torch.Tensor, layout: G.SegmentLayout, cos, sin) -> torch.Tensor:
        return G.rope_segment_attention(qkv, layout, cos, sin, self.num_heads, self.head_dim, self.scaling)


def interpolation_taps(coords: G.PatchCoords, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) taps into the flat `side × side` table for every patch of every image.

    HF's arithmetic in float32 (`_interpolation_axis_taps_weights`): source `i * (side - 1) / max(size - 1, 1)`,
    taps floor / floor + 1 clamped to the border, weights `1 - |distance|`; ([N, 4] int64, [N, 4] float32).
    """
    def axis(index: torch.Tensor, size: torch.Tensor):
        src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1).to(torch.float32)
        floor = torch.floor(src)
        offsets = torch.arange(2, dtype=torch.int64, device=index.device)
        taps = (floor.to(torch.int64)[:, None] + offsets).clamp(0, side - 1)
        weights = (1 - (src[:, None] - floor[:, None] - offsets.to(torch.float32)).abs()).clamp(min=0)
        return taps, weights

    h_taps, h_w = axis(coords.row, G.rows(coords.h, coords.image))
    w_taps, w_w = axis(coords.col, G.rows(coords.w, coords.image))
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices, weights


def _check_interpolation(visual: nn.Module) -> None:
    if (visual.interpolation_mode, visual.interpolation_align_corners) != ("bilinear", True):
        raise ExportError(
            f"Qwen3-VL position-embedding interpolation is {visual.interpolation_mode!r} "
            f"(align_corners={visual.interpolation_align_corners}); vlmforge reproduces only bilinear/True",
            where="transformers Qwen3VLVisionModel",
            fix="use the pinned transformers version (constraints.txt)",
        )


def build_vision_module(hf_model, deepstack: bool = True) -> DynamicVisionForExport:
    visual = _visual(hf_model)
    dims.check_deepstack_indexes(visual.config, where="config.json vision_config.deepstack_visual_indexes")
    return DynamicVisionForExport(visual, deepstack=deepstack).eval()


def vision_contract(hf_config, deepstack: bool = True) -> StageContract:
    vcfg = _vision_cfg(hf_config)
    layers = dims.deepstack_layers(vcfg) if deepstack else []
    out = vcfg.out_hidden_size
    outputs = [TensorSpec("image_features", "float32", ("num_image_tokens", out))]
    if deepstack:
        outputs.append(TensorSpec("deepstack_features", "float32", (len(layers), "num_image_tokens", out)))
    return StageContract(
        stage=STAGE,
        inputs=(
            TensorSpec("pixel_values", "float32", ("num_patches", dims.patch_dim(vcfg))),
            TensorSpec("image_grid_thw", "int64", ("num_images", 3)),
        ),
        outputs=tuple(outputs),
        meta={"vision": "dynamic", "merge_size": vcfg.spatial_merge_size, "deepstack_layers": layers},
    )


def example_inputs(hf_config, grids=((1, 8, 12), (1, 4, 4)), seed: int = 0):
    """(pixel_values, image_grid_thw) for `grids`; values ~N(0, 1) like normalised pixels."""
    vcfg = _vision_cfg(hf_config)
    gen = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, dims.patch_dim(vcfg), generator=gen), torch.tensor(grids, dtype=torch.int64)


def export_vision(hf_model, out_path: Path, deepstack: bool = True) -> StageContract:
    from vlmforge.exporters.onnx_export import export_module

    module = build_vision_module(hf_model, deepstack=deepstack)
    contract = vision_contract(hf_model.config, deepstack=deepstack)
    export_module(
        module,
        example_inputs(hf_model.config),
        out_path,
        input_names=contract.input_names,
        output_names=contract.output_names,
        dynamic_shapes=G.export_dims(module.merge),
        stage="qwen3_vl/vision_dynamic",
        contract=contract,
    )
    return contract


def stage_contract(hf_config, options) -> StageContract:
    """The StageSpec hook of a vision=dynamic build (FamilySpec.dynamic_vision): only the DeepStack choice."""
    return vision_contract(hf_config, options.deepstack)


def stage_export(hf_model, options, out_path: Path) -> StageContract:
    """The StageSpec hook of a vision=dynamic build (FamilySpec.dynamic_vision): only the DeepStack choice."""
    return export_vision(hf_model, out_path, options.deepstack)
