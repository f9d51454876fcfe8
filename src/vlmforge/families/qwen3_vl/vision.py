"""Qwen3-VL vision stage: ViT + patch merger + DeepStack mergers as a static-shape graph for one fixed grid.

The stock HF forward cannot be exported (field notes §4): it derives the position-embedding interpolation,
the rotary positions and the per-image attention `split` from `grid_thw` with `.tolist()`. For a fixed
image size all of that is known on the host, so `VisionForExport` computes it once and keeps it as
buffers; the graph then holds only static-shape tensor ops:

- patch embedding as one MatMul + bias with the Conv3d weight reshaped (kernel == stride, so it is the
  same sum; the Conv cost ~25% of vision time in onnxruntime, §11);
- the learned position table resampled to the grid by a Gather of 4 bilinear taps per patch and a
  weighted sum (indices and weights are buffers, in spatial-merge-block order like `pixel_values`);
- every block attends over all patches of the single image: one segment, so no mask and no split;
- DeepStack: the outputs of the blocks in `deepstack_visual_indexes` go through their own mergers and are
  stacked as `[num_deepstack, num_tokens, out_hidden]` in block order, the order the decoder adds them.

`deepstack=False` builds the variant for onnxruntime-genai 0.18, which has no DeepStack input (§9).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vlmforge.core.contracts import StageContract, TensorSpec
from vlmforge.host.sizes import size_json
from vlmforge.core.errors import CheckpointError, ExportError, RecipeError
from vlmforge.families.qwen3_vl import dims

STAGE = "vision"
INPUT_NAMES = ("pixel_values", "image_grid_thw")


class VisionForExport(nn.Module):
    """HF `Qwen3VLVisionModel` for one fixed `grid_thw`, static shapes throughout.

    Holds references to the HF submodules (no weight copies); only index/weight/rotary constants are new.
    `image_grid_thw` is accepted and unused: onnxruntime-genai feeds it, so it must stay a graph input.
    """

    def __init__(self, visual: nn.Module, grid: tuple[int, int, int], deepstack: bool = True) -> None:
        super().__init__()
        cfg = visual.config
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.grid = tuple(int(x) for x in grid)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.scaling = self.head_dim**-0.5
        # block index -> position in `deepstack_merger_list` (HF: `deepstack_visual_indexes.index(layer)`)
        order = [int(i) for i in visual.deepstack_visual_indexes]
        self.deepstack_layers = dims.deepstack_layers(cfg) if deepstack else []
        self.deepstack_mergers = (
            nn.ModuleList([visual.deepstack_merger_list[order.index(i)] for i in self.deepstack_layers])
            if deepstack
            else None
        )

        consts = _host_constants(visual, self.grid)
        self.register_buffer("interp_indices", consts["interp_indices"], persistent=False)
        self.register_buffer("interp_weights", consts["interp_weights"], persistent=False)
        self.register_buffer("cos", consts["cos"], persistent=False)
        self.register_buffer("sin", consts["sin"], persistent=False)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        x = _embed(self, pixel_values)
        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = _block(self, blk, x)
            if i in self.deepstack_layers:
                deepstack.append(self.deepstack_mergers[self.deepstack_layers.index(i)](x))
        return _finish(self.merger, self.deepstack_mergers is not None, x, deepstack)

    def pieces(self) -> tuple[nn.Module, list[nn.Module], nn.Module]:
        """The same computation as a head, one step per block (a DeepStack block also returns its merger's output)
        and a tail, for exporters.layered.blockwise_model (each kind of block traced once)."""
        return _Head(self), [_Block(self, i) for i in range(len(self.blocks))], _Tail(self)


def _embed(holder, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding plus the resampled position table; `holder` has patch_embed, pos_embed and the taps."""
    weight = holder.patch_embed.proj.weight  # [hidden, C, T, P, P]; kernel == stride
    x = F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), holder.patch_embed.proj.bias)
    pos = (holder.pos_embed(holder.interp_indices) * holder.interp_weights[:, :, None]).sum(1)
    return x + pos.to(x.dtype)


def _block(holder, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One block; `holder` has num_heads, head_dim, scaling and the rotary cos/sin."""
    x = x + blk.attn.proj(_attention(holder, blk.attn, blk.norm1(x)))
    return x + blk.mlp(blk.norm2(x))


def _attention(holder, attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Full multi-head self-attention with 2-D RoPE over [N, C]; returns [N, C] before `proj`."""
    n, c = h.shape
    q, k, v = attn.qkv(h).reshape(n, 3, holder.num_heads, holder.head_dim).permute(1, 2, 0, 3).unbind(0)
    q = q * holder.cos + _rotate_half(q) * holder.sin  # [H, N, D]; cos/sin [N, D]
    k = k * holder.cos + _rotate_half(k) * holder.sin
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=holder.scaling)
    return out[0].transpose(0, 1).reshape(n, c)


def _finish(merger: nn.Module, deepstack: bool, x: torch.Tensor, slices):
    features = merger(x)
    if not deepstack:
        return (features,)
    return features, torch.stack(list(slices), dim=0)


class _Head(nn.Module):
    def __init__(self, tower: VisionForExport) -> None:
        super().__init__()
        self.patch_embed, self.pos_embed = tower.patch_embed, tower.pos_embed
        for name in ("interp_indices", "interp_weights"):
            self.register_buffer(name, getattr(tower, name), persistent=False)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        return _embed(self, pixel_values)


class _Block(nn.Module):
    """Block `index`, and the DeepStack merger that reads its output when it has one."""

    def __init__(self, tower: VisionForExport, index: int) -> None:
        super().__init__()
        self.block = tower.blocks[index]
        self.num_heads, self.head_dim, self.scaling = tower.num_heads, tower.head_dim, tower.scaling
        for name in ("cos", "sin"):
            self.register_buffer(name, getattr(tower, name), persistent=False)
        self.deepstack = index in tower.deepstack_layers
        if self.deepstack:
            self.merger = tower.deepstack_mergers[tower.deepstack_layers.index(index)]

    def forward(self, x: torch.Tensor):
        x = _block(self, self.block, x)
        return (x, self.merger(x)) if self.deepstack else (x,)


class _Tail(nn.Module):
    def __init__(self, tower: VisionForExport) -> None:
        super().__init__()
        self.merger = tower.merger
        self.deepstack = tower.deepstack_mergers is not None

    def forward(self, x: torch.Tensor, *slices):
        return _finish(self.merger, self.deepstack, x, slices)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def merge_order_rows_cols(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch in spatial-merge-block order: (block_row, block_col, in_row, in_col).

    That is the order of `pixel_values` rows from the image processor and of HF's position ids.
    """
    rows = torch.arange(h).reshape(h // merge, 1, merge, 1).expand(h // merge, w // merge, merge, merge)
    cols = torch.arange(w).reshape(1, w // merge, 1, merge).expand(h // merge, w // merge, merge, merge)
    return rows.reshape(-1), cols.reshape(-1)


def interpolation_taps(h: int, w: int, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) taps into the flat `side × side` position table, merge order.

    Same arithmetic, in float32, as HF's `get_vision_interpolation_indices_and_weights` (5.x), which
    replaced `fast_pos_embed_interpolate`: source coordinate `i * (side - 1) / (size - 1)`, taps
    floor/floor+1 clamped to the border, weights `1 - |distance|`. Returns ([N, 4] int64, [N, 4] float32),
    taps ordered (top-left, top-right, bottom-left, bottom-right).
    """
    rows, cols = merge_order_rows_cols(h, w, merge)

    def axis(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
        floor = torch.floor(src)
        offsets = torch.arange(2)
        taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
        weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
        return taps, weights

    h_taps, h_w = axis(rows, h)
    w_taps, w_w = axis(cols, w)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices, weights


@torch.no_grad()
def _host_constants(visual: nn.Module, grid: tuple[int, int, int]) -> dict:
    """Every grid-dependent constant of the stock forward, for one image (t == 1)."""
    cfg = visual.config
    t, h, w = grid
    if t != 1:
        raise RecipeError(
            f"the Qwen3-VL vision graph is built for one image (t = 1), got grid {grid}",
            where="vision stage",
            fix="export images only; video (t > 1) is not supported by the fixed-size vision graph",
        )
    if (visual.interpolation_mode, visual.interpolation_align_corners) != ("bilinear", True):
        raise ExportError(
            f"Qwen3-VL position-embedding interpolation is {visual.interpolation_mode!r} "
            f"(align_corners={visual.interpolation_align_corners}); vlmforge reproduces only bilinear/True",
            where="transformers Qwen3VLVisionModel",
            fix="use the pinned transformers version (constraints.txt)",
        )
    indices, weights = interpolation_taps(h, w, visual.num_grid_per_side, cfg.spatial_merge_size)
    rows, cols = merge_order_rows_cols(h, w, cfg.spatial_merge_size)
    weight = visual.patch_embed.proj.weight
    # the tower's own rotary module on our position ids: its inv_freq and h/w recomposition, unchanged
    cos, sin = visual.rotary_pos_emb(weight, torch.stack([rows, cols], dim=-1))
    return {
        "interp_indices": indices,
        "interp_weights": weights,  # float32 like HF's, so the weighted sum promotes as in the stock path
        "cos": cos.to(weight.dtype),  # [N, head_dim]
        "sin": sin.to(weight.dtype),
    }


def _visual(hf_model) -> nn.Module:
    """The vision tower of a full Qwen3-VL model (or the tower itself)."""
    if hasattr(hf_model, "patch_embed"):
        return hf_model
    inner = getattr(hf_model, "model", hf_model)
    return inner.visual


def _vision_cfg(hf_config):
    return getattr(hf_config, "vision_config", hf_config)


def _check(vcfg, image_size, deepstack: bool) -> None:
    dims.check_image_size(image_size, where="vision.image_size")
    dims.check_deepstack_indexes(vcfg, where="config.json vision_config.deepstack_visual_indexes")
    if deepstack and not dims.deepstack_layers(vcfg):
        raise CheckpointError(
            "Qwen3-VL checkpoint lists no deepstack_visual_indexes; a DeepStack vision graph has nothing to emit",
            where="config.json vision_config.deepstack_visual_indexes",
            fix="export the vision stage with deepstack=False",
        )


def build_vision_module(hf_model, image_size, deepstack: bool = True) -> VisionForExport:
    visual = _visual(hf_model)
    _check(visual.config, image_size, deepstack)
    return VisionForExport(visual, dims.grid_thw(visual.config, image_size), deepstack=deepstack).eval()


def vision_contract(hf_config, image_size, deepstack: bool = True) -> StageContract:
    vcfg = _vision_cfg(hf_config)
    _check(vcfg, image_size, deepstack)
    grid = dims.grid_thw(vcfg, image_size)
    tokens = dims.tokens_per_image(vcfg, image_size)
    layers = dims.deepstack_layers(vcfg) if deepstack else []
    outputs = [TensorSpec("image_features", "float32", (tokens, vcfg.out_hidden_size))]
    if deepstack:
        outputs.append(TensorSpec("deepstack_features", "float32", (len(layers), tokens, vcfg.out_hidden_size)))
    return StageContract(
        stage=STAGE,
        inputs=(
            TensorSpec("pixel_values", "float32", (dims.num_patches(vcfg, image_size), dims.patch_dim(vcfg))),
            TensorSpec("image_grid_thw", "int64", (1, 3)),
        ),
        outputs=tuple(outputs),
        meta={"image_size": size_json(image_size), "grid_thw": list(grid), "tokens_per_image": tokens, "deepstack_layers": layers},
    )


def example_inputs(hf_config, image_size, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) of the contract's shapes; values ~N(0, 1) like normalised pixels."""
    contract = vision_contract(hf_config, image_size, deepstack=False)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(*contract.input("pixel_values").shape, generator=gen)
    grid = torch.tensor([contract.meta["grid_thw"]], dtype=torch.long)
    return pixel_values, grid


def export_vision(hf_model, image_size, out_path: Path, deepstack: bool = True) -> StageContract:
    from vlmforge.exporters.layered import blockwise_model
    from vlmforge.exporters.onnx_export import export_module

    module = build_vision_module(hf_model, image_size, deepstack=deepstack)
    contract = vision_contract(hf_model.config, image_size, deepstack=deepstack)
    export_module(
        module,
        example_inputs(hf_model.config, image_size),
        out_path,
        input_names=contract.input_names,
        output_names=contract.output_names,
        dynamic_shapes=None,
        stage="qwen3_vl/vision",
        contract=contract,
        trace=blockwise_model,
    )
    return contract


@torch.no_grad()
def reference_vision(hf_model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: the stock HF path, (image_features [T, out], deepstack_features [L, T, out]).

    For a full model this is `model.get_image_features` — what `forward`/`generate` run — whose
    `pooler_output` / `deepstack_features` are split per image (tuples); they are concatenated back.
    For a bare tower, its `pooler_output` / `deepstack_features` list directly.
    """
    inner = getattr(hf_model, "model", hf_model)
    if hasattr(inner, "get_image_features"):
        out = inner.get_image_features(pixel_values, grid_thw, return_dict=True)
        features = torch.cat(out.pooler_output, dim=0)
        deepstack = [torch.cat(f, dim=0) for f in out.deepstack_features]
    else:
        visual = _visual(hf_model)
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, return_dict=True)
        features, deepstack = out.pooler_output, list(out.deepstack_features)
    stacked = torch.stack(deepstack) if deepstack else features.new_zeros((0, *features.shape))
    return features, stacked


def stage_contract(hf_config, options) -> StageContract:
    """The StageSpec hook: the build's StageOptions -> this module's arguments (image size, DeepStack)."""
    return vision_contract(hf_config, options.image_size, options.deepstack)


def stage_export(hf_model, options, out_path: Path) -> StageContract:
    """The StageSpec hook: the build's StageOptions -> this module's arguments (image size, DeepStack)."""
    return export_vision(hf_model, options.image_size, out_path, options.deepstack)
