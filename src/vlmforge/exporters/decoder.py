"""Language-model decoder with a flat KV cache, family-agnostic.

The HF decoder layers, rotary embedding, final norm and LM head are used as they are (composition);
vlmforge owns only the loop around them: the 2-D padding mask becomes one causal additive mask, the
flat `past_key_values.{i}.key/value` tensors are concatenated per layer, and Qwen3-VL DeepStack
embeddings are added after the first layers exactly where HF adds them. Nothing Cache-typed crosses
the graph boundary (field notes §6).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import AttentionInterface

from vlmforge.core.contracts import StageContract, TensorSpec

ATTN_IMPL = "vlmforge_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention that broadcasts the grouped KV heads instead of copying them per query head.

    HF's eager path calls `repeat_kv`, which the exporter turns into an Expand+Reshape copy of the whole
    KV cache every step: ~1.4x slower per token at 4k context at Qwen2.5-VL-3B shapes (field notes §11).
    The G query heads of a KV head and the S query positions are folded into the rows of one matrix
    product per KV head ([G*S, D] x [D, T]): a 5-D broadcast ([G, S, D] x [1, D, T]) runs as G separate
    row-vector products in onnxruntime, each re-reading (and re-packing) the same keys, which measured
    2x slower at decode (0.81 vs 0.40 ms per layer at 4k context, Qwen2.5-VL-3B shapes, 1 thread).
    Both are exact. query [B, Hq, S, D], key/value [B, Hkv, T, D], attention_mask additive [B, 1, S, T].
    """
    b, hq, s, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    g = hq // hkv
    q = query.reshape(b, hkv, g * s, d)  # head h = kv * G + g: rows (g, s) of KV head kv
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # [B, Hkv, G*S, T]
    if attention_mask is not None:
        scores = (scores.reshape(b, hkv, g, s, t) + attention_mask.unsqueeze(2)).reshape(b, hkv, g * s, t)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs, value).reshape(b, hq, s, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPL, grouped_attention)


@contextlib.contextmanager
def grouped_attention_on(text_config) -> Iterator[None]:
    """Route the text decoder's attention through `grouped_attention` for the duration of an export.

    Scoped: the config's previous implementation is restored on exit, so the HF model used as the
    validation reference keeps running its stock attention.
    """
    previous = text_config._attn_implementation
    text_config._attn_implementation = ATTN_IMPL
    try:
        yield
    finally:
        text_config._attn_implementation = previous


class _FlatCache:
    """The one Cache method HF attention calls (`update`), over plain tensors; collects the presents."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key, value, layer_idx, *args, **kwargs):
        past_k, past_v = self.past[layer_idx]
        k = torch.cat([past_k.to(key.dtype), key], dim=2)
        v = torch.cat([past_v.to(value.dtype), value], dim=2)
        self.present.append((k, v))
        return k, v


def causal_mask(attention_mask: torch.Tensor, query_len, dtype: torch.dtype) -> torch.Tensor:
    """[B, total] 0/1 padding mask -> additive [B, 1, S, total]: key j visible to query i iff j <= past + i."""
    total = attention_mask.shape[1]
    past = total - query_len
    q_pos = torch.arange(query_len, dtype=torch.int64).unsqueeze(1) + past  # [S, 1]
    k_pos = torch.arange(total, dtype=torch.int64).unsqueeze(0)  # [1, T]
    allowed = (k_pos <= q_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # [B, S, T]
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, torch.zeros((), dtype=dtype), neg).unsqueeze(1)


class DecoderForExport(torch.nn.Module):
    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module, deepstack_layers: int = 0) -> None:
        super().__init__()
        self.lm = language_model
        self.lm_head = lm_head
        self.num_layers = len(language_model.layers)
        self.deepstack_layers = int(deepstack_layers)

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
        if self.deepstack_layers:
            deepstack_embeds, flat_past = rest[0], rest[1:]
        else:
            deepstack_embeds, flat_past = None, rest
        past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(self.num_layers)]
        cache = _FlatCache(past)
        hidden = inputs_embeds
        mask = causal_mask(attention_mask, hidden.shape[1], hidden.dtype)
        position_embeddings = self.lm.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(self.lm.layers):
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_values=cache,
                use_cache=True,
            )
            if deepstack_embeds is not None and i < self.deepstack_layers:
                hidden = hidden + deepstack_embeds[i].to(hidden.dtype)
        logits = self.lm_head(self.lm.norm(hidden))
        presents = [t for kv in cache.present for t in kv]
        return (logits, *presents)


def decoder_dims(text_config) -> dict:
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return {
        "num_layers": text_config.num_hidden_layers,
        "hidden": text_config.hidden_size,
        "heads": text_config.num_attention_heads,
        "kv_heads": text_config.num_key_value_heads,
        "head_dim": head_dim,
        "vocab": text_config.vocab_size,
    }


def decoder_contract(text_config, deepstack_layers: int = 0, dtype: str = "float32") -> StageContract:
    d = decoder_dims(text_config)
    inputs = [
        TensorSpec("inputs_embeds", dtype, ("batch_size", "sequence_length", d["hidden"])),
        TensorSpec("attention_mask", "int64", ("batch_size", "total_sequence_length")),
        TensorSpec("position_ids", "int64", (3, "batch_size", "sequence_length")),
    ]
    if deepstack_layers:
        inputs.append(
            TensorSpec("deepstack_embeds", dtype, (deepstack_layers, "batch_size", "sequence_length", d["hidden"]))
        )
    outputs = [TensorSpec("logits", dtype, ("batch_size", "sequence_length", d["vocab"]))]
    kv_past = ("batch_size", d["kv_heads"], "past_sequence_length", d["head_dim"])
    kv_present = ("batch_size", d["kv_heads"], "total_sequence_length", d["head_dim"])
    for i in range(d["num_layers"]):
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past_key_values.{i}.{kind}", dtype, kv_past))
            outputs.append(TensorSpec(f"present.{i}.{kind}", dtype, kv_present))
    meta = {**d, "deepstack_layers": deepstack_layers}
    return StageContract("decoder", tuple(inputs), tuple(outputs), meta)


def example_inputs(text_config, deepstack_layers: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """B=2, S=3, past=5: sizes that avoid 0/1 specialisation (field notes §6)."""
    d = decoder_dims(text_config)
    b, s, p = 2, 3, 5
    g = torch.Generator().manual_seed(0)
    args: list[torch.Tensor] = [
        torch.randn(b, s, d["hidden"], generator=g, dtype=dtype),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.arange(p, p + s, dtype=torch.int64).view(1, 1, s).expand(3, b, s).contiguous(),
    ]
    if deepstack_layers:
        args.append(torch.randn(deepstack_layers, b, s, d["hidden"], generator=g, dtype=dtype))
    for _ in range(d["num_layers"] * 2):
        args.append(torch.randn(b, d["kv_heads"], p, d["head_dim"], generator=g, dtype=dtype))
    return tuple(args)


def dynamic_shapes(text_config, deepstack_layers: int = 0) -> tuple:
    d = decoder_dims(text_config)
    b = torch.export.Dim("batch_size")
    s = torch.export.Dim("sequence_length")
    p = torch.export.Dim("past_sequence_length")
    rest: list = [{1: b, 2: s}] if deepstack_layers else []
    rest += [{0: b, 2: p}] * (2 * d["num_layers"])
    # forward(*rest) takes the varargs as one tuple; the total length is inferred (= past + sequence).
    return ({0: b, 1: s}, {0: b, 1: torch.export.Dim.AUTO}, {1: b, 2: s}, tuple(rest))
