"""Qwen2.5-VL vision stage: the windowed ViT + patch merger as a static-shape graph for one fixed grid.

The stock HF forward cannot be exported (field notes §4): it derives the window permutation, rotary
positions and per-window `split` lengths from `grid_thw` with `.tolist()` loops. For a fixed image size all
of that is known on the host, so `VisionForExport` computes it once, with HF's own helpers, and keeps it as
buffers; the graph then holds only static-shape tensor ops:

- patch embedding as one MatMul with the Conv3d weight reshaped (kernel == stride, so it is the same sum;
  the Conv cost ~25% of vision time in onnxruntime, §11);
- windowed blocks gather the (window-ordered) sequence into [num_windows, max_window_len] with a key
  padding mask only when edge windows are smaller (e.g. 392 px); when all windows are full (sides that are
  multiples of 112 px, e.g. 672) the layout is a plain reshape and there is no mask;
- full-attention blocks attend over all patches of the single image, no mask.
A dense block-diagonal N×N mask would be O(N²) and measured 4.5× slower at 672 px (§4), hence the batching.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vlmforge.core.contracts import StageContract, TensorSpec
from vlmforge.host.sizes import size_json
from vlmforge.exporters.layered import blockwise_model
from vlmforge.exporters.onnx_export import export_module
from vlmforge.families.qwen2_5_vl import dims

STAGE = "vision"


class _Attention:
    """The tower's blocks over one grid's constants: shared by the whole tower and its pieces (exporters.layered),
    which hold the same attributes and buffers."""

    def _block(self, blk: nn.Module, full: bool, x: torch.Tensor) -> torch.Tensor:
        qkv = blk.attn.qkv(blk.norm1(x))  # [N, 3C], on the unpadded sequence
        if full:
            h = self._attention(qkv.unsqueeze(0), self.cos, self.sin, None).squeeze(0)
        else:
            h = self._windowed_attention(qkv)
        x = x + blk.attn.proj(h)
        return x + blk.mlp(blk.norm2(x))

    def _windowed_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        n_win, win_len = self.num_windows, self.window_len
        if self.uniform_windows:  # windows are contiguous and equal: a reshape, no gather, no mask
            out = self._attention(qkv.reshape(n_win, win_len, -1), self.win_cos, self.win_sin, None)
            return out.reshape(self.num_patches, -1)
        batched = qkv[self.win_gather].reshape(n_win, win_len, -1)
        out = self._attention(batched, self.win_cos, self.win_sin, self.win_mask)
        return out.reshape(n_win * win_len, -1)[self.win_scatter]

    def _attention(self, qkv, cos, sin, mask):
        """Multi-head self-attention with 2-D RoPE; qkv [B, L, 3C] -> [B, L, C] (before `proj`)."""
        b, n, c3 = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * cos + _rotate_half(q) * sin  # [B, H, L, D]
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return out.transpose(1, 2).reshape(b, n, c3 // 3)


_PLAIN = ("num_heads", "head_dim", "scaling", "num_patches", "num_windows", "window_len", "uniform_windows")
_FULL_BUFFERS = ("cos", "sin")
_WINDOW_BUFFERS = ("win_cos", "win_sin", "win_gather", "win_scatter", "win_mask")


class VisionForExport(_Attention, nn.Module):
    """HF `Qwen2_5_VisionTransformerPretrainedModel` for one fixed `grid_thw`, static shapes throughout.

    Holds references to the HF submodules (no weight copies); only index/rotary/mask constants are new.
    `image_grid_thw` is accepted and unused: onnxruntime-genai feeds it, so it must stay a graph input.
    `pieces()` is the same computation as a head, one step per block and a tail (exporters.layered.blockwise_model
    traces each kind of block once: the windowed and the full-attention ones).
    """

    def __init__(self, visual: nn.Module, grid: tuple[int, int, int]) -> None:
        super().__init__()
        cfg = visual.config
        self.patch_embed = visual.patch_embed
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.fullatt = frozenset(int(i) for i in visual.fullatt_block_indexes)
        self.grid = tuple(int(x) for x in grid)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.scaling = self.head_dim**-0.5

        layout = _host_layout(visual, self.grid)
        self.num_patches = layout["num_patches"]
        self.num_windows, self.window_len = layout["num_windows"], layout["window_len"]
        self.uniform_windows = layout["uniform"]
        for name in ("patch_order", "reverse_index", *_FULL_BUFFERS, *_WINDOW_BUFFERS):
            self.register_buffer(name, layout[name], persistent=False)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        x = _embed(self.patch_embed, self.patch_order, pixel_values)
        for i, blk in enumerate(self.blocks):
            x = self._block(blk, i in self.fullatt, x)
        return self.merger(x)[self.reverse_index]

    def pieces(self) -> tuple[nn.Module, list[nn.Module], nn.Module]:
        return _Head(self), [_Block(self, i) for i in range(len(self.blocks))], _Tail(self)


def _embed(patch_embed: nn.Module, patch_order: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    weight = patch_embed.proj.weight  # [hidden, C, T, P, P]; kernel == stride
    x = pixel_values.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()
    return x[patch_order]  # window order (HF's permute_input_for_window_attn)


class _Head(nn.Module):
    def __init__(self, tower: VisionForExport) -> None:
        super().__init__()
        self.patch_embed = tower.patch_embed
        self.register_buffer("patch_order", tower.patch_order, persistent=False)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        return _embed(self.patch_embed, self.patch_order, pixel_values)


class _Block(_Attention, nn.Module):
    """Block `index` of the tower, with the constants of its kind of attention (full or windowed) only."""

    def __init__(self, tower: VisionForExport, index: int) -> None:
        super().__init__()
        self.block = tower.blocks[index]
        self.full = index in tower.fullatt
        for name in _PLAIN:
            setattr(self, name, getattr(tower, name))
        for name in _FULL_BUFFERS if self.full else _WINDOW_BUFFERS[: 2 if tower.uniform_windows else 5]:
            self.register_buffer(name, getattr(tower, name), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self._block(self.block, self.full, x),)


class _Tail(nn.Module):
    def __init__(self, tower: VisionForExport) -> None:
        super().__init__()
        self.merger = tower.merger
        self.register_buffer("reverse_index", tower.reverse_index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger(x)[self.reverse_index]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def _host_layout(visual: nn.Module, grid: tuple[int, int, int]) -> dict:
    """Every grid-dependent constant, computed with HF's own helpers so it matches the stock forward."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    cfg = visual.config
    merge_unit = cfg.spatial_merge_size**2
    grid_t = torch.tensor([grid], dtype=torch.long)
    n = grid[0] * grid[1] * grid[2]
    window_index, cu_window = get_vision_window_index(
        grid_t, spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size, patch_size=cfg.patch_size
    )
    patch_order = (window_index[:, None] * merge_unit + torch.arange(merge_unit)).reshape(-1)

    weight = visual.patch_embed.proj.weight
    position_ids = get_vision_position_ids(grid_t, cfg.spatial_merge_size)
    cos, sin = visual.rotary_pos_emb(weight, position_ids)  # [N, D], patch order
    cos, sin = cos[patch_order].float(), sin[patch_order].float()

    cu = [int(x) for x in cu_window.tolist()]
    starts, lens = cu[:-1], [b - a for a, b in zip(cu[:-1], cu[1:])]
    n_win, win_len = len(lens), max(lens)
    gather = torch.tensor([s + min(j, ln - 1) for s, ln in zip(starts, lens) for j in range(win_len)])
    valid = torch.tensor([[j < ln for j in range(win_len)] for ln in lens])
    scatter = torch.tensor([w * win_len + j for w, ln in enumerate(lens) for j in range(ln)])
    mask = torch.zeros(n_win, 1, 1, win_len, dtype=torch.float32)
    mask.masked_fill_(~valid[:, None, None, :], torch.finfo(torch.float32).min)
    dtype = weight.dtype
    return {
        "num_patches": n,
        "num_windows": n_win,
        "window_len": win_len,
        "uniform": len(set(lens)) == 1,
        "patch_order": patch_order,
        "reverse_index": torch.argsort(window_index),
        "cos": cos[None, None].to(dtype),  # [1, 1 (heads), N, D]
        "sin": sin[None, None].to(dtype),
        "win_cos": cos[gather].reshape(n_win, 1, win_len, -1).to(dtype),
        "win_sin": sin[gather].reshape(n_win, 1, win_len, -1).to(dtype),
        "win_gather": gather,
        "win_scatter": scatter,
        "win_mask": mask.to(dtype),
    }


def _visual(hf_model) -> nn.Module:
    """The vision tower of a full Qwen2.5-VL model (or the tower itself)."""
    if hasattr(hf_model, "patch_embed"):
        return hf_model
    inner = getattr(hf_model, "model", hf_model)
    return inner.visual


def _vision_cfg(hf_config):
    """`vision_config` of a full config (object or config.json dict), or the vision config itself."""
    if isinstance(hf_config, dict):
        return hf_config.get("vision_config", hf_config)
    return getattr(hf_config, "vision_config", hf_config)


def build_vision_module(hf_model, image_size) -> VisionForExport:
    dims.check_image_size(image_size, where="vision.image_size")
    visual = _visual(hf_model)
    return VisionForExport(visual, dims.grid_thw(visual.config, image_size)).eval()


def vision_contract(hf_config, image_size) -> StageContract:
    dims.check_image_size(image_size, where="vision.image_size")
    vcfg = _vision_cfg(hf_config)
    grid = dims.grid_thw(vcfg, image_size)
    tokens = dims.tokens_per_image(vcfg, image_size)
    return StageContract(
        stage=STAGE,
        inputs=(
            TensorSpec("pixel_values", "float32", (dims.num_patches(vcfg, image_size), dims.patch_dim(vcfg))),
            TensorSpec("image_grid_thw", "int64", (1, 3)),
        ),
        outputs=(TensorSpec("image_features", "float32", (tokens, dims.out_hidden_size(vcfg))),),
        meta={"image_size": size_json(image_size), "grid_thw": list(grid), "tokens_per_image": tokens},
    )


def example_inputs(hf_config, image_size, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) of the contract's shapes; values ~N(0, 1) like normalised pixels."""
    contract = vision_contract(hf_config, image_size)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(*contract.input("pixel_values").shape, generator=gen)
    grid = torch.tensor([contract.meta["grid_thw"]], dtype=torch.long)
    return pixel_values, grid


def export_vision(hf_model, image_size, out_path: Path) -> StageContract:
    module = build_vision_module(hf_model, image_size)
    contract = vision_contract(hf_model.config, image_size)
    export_module(
        module,
        example_inputs(hf_model.config, image_size),
        out_path,
        input_names=contract.input_names,
        output_names=contract.output_names,
        dynamic_shapes=None,
        stage="qwen2_5_vl/vision",
        contract=contract,
        trace=blockwise_model,
    )
    return contract


@torch.no_grad()
def reference_vision(hf_model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Ground truth: the stock HF tower. Its `pooler_output` is the merged features in image order."""
    out = _visual(hf_model)(pixel_values, grid_thw=grid_thw)
    return out.pooler_output


def stage_contract(hf_config, options) -> StageContract:
    """The StageSpec hook: the build's StageOptions -> this module's arguments (only the image size)."""
    return vision_contract(hf_config, options.image_size)


def stage_export(hf_model, options, out_path: Path) -> StageContract:
    """The StageSpec hook: the build's StageOptions -> this module's arguments (only the image size)."""
    return export_vision(hf_model, options.image_size, out_path)
