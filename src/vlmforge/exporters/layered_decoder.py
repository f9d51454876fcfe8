"""The decoder traced once per kind of layer (exporters.layered assembles the pieces).

torch.onnx traces, decomposes and translates every decoder layer again although the layers are the same code with
other weights: at Qwen2.5-VL-3B widths most of the INT4 decoder's export time before its first weight is written
(36 layers). Here the decoder (`exporters.decoder.DecoderForExport`) is traced in pieces, each by torch.onnx exactly
as the whole module would be (dynamo, optimize=False):
- the head: the causal additive mask and the rotary position embeddings, from the graph's first inputs (and the
  DeepStack slices `deepstack_embeds[i]`);
- one layer of each kind: a plain layer, and a DeepStack layer (a layer followed by the addition of its slice);
- the tail: final norm and LM head.
The graph computes what the whole trace computes (tests/exporters/test_layered.py: the same outputs, bit for bit, on
both families' fixtures, tied and untied heads).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmforge.exporters.decoder import causal_mask
from vlmforge.exporters.layered import Assembly, first_of_kind, signature, trace_piece
from vlmforge.exporters.onnx_export import NotLayered


class _OneLayerCache:
    """`update` for the one layer of a piece, whatever its `layer_idx`; collects the presents."""

    def __init__(self, past_k, past_v) -> None:
        self.past = (past_k, past_v)
        self.present: tuple | None = None

    def update(self, key, value, layer_idx, *args, **kwargs):
        k = torch.cat([self.past[0].to(key.dtype), key], dim=2)
        v = torch.cat([self.past[1].to(value.dtype), value], dim=2)
        self.present = (k, v)
        return k, v


class _Head(torch.nn.Module):
    """(inputs_embeds, attention_mask, position_ids[, deepstack_embeds]) -> (mask, *position_embeddings, *slices)."""

    def __init__(self, decoder) -> None:
        super().__init__()
        self.lm = torch.nn.Module()
        self.lm.rotary_emb = decoder.lm.rotary_emb
        self.deepstack_layers = decoder.deepstack_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *deepstack):
        mask = causal_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
        pos = self.lm.rotary_emb(inputs_embeds, position_ids)
        slices = [deepstack[0][i].to(inputs_embeds.dtype) for i in range(self.deepstack_layers)] if deepstack else []
        return (mask, *pos, *slices)


class _Step(torch.nn.Module):
    """One decoder layer: (hidden, mask, *position_embeddings, past_k, past_v[, slice]) -> (hidden, k, v)."""

    def __init__(self, layer, n_pos: int, deepstack: bool) -> None:
        super().__init__()
        self.layer = layer
        self.n_pos = n_pos
        self.deepstack = deepstack

    def forward(self, hidden, mask, *rest):
        pos, rest = rest[: self.n_pos], rest[self.n_pos:]
        cache = _OneLayerCache(rest[0], rest[1])
        hidden = self.layer(hidden, attention_mask=mask, position_embeddings=tuple(pos), past_key_values=cache,
                            use_cache=True)
        if self.deepstack:
            hidden = hidden + rest[2]
        return (hidden, *cache.present)


class _Tail(torch.nn.Module):
    def __init__(self, decoder) -> None:
        super().__init__()
        self.lm = torch.nn.Module()
        self.lm.norm = decoder.lm.norm
        self.lm_head = decoder.lm_head

    def forward(self, hidden):
        return self.lm_head(self.lm.norm(hidden))


def _varying_dims(a: tuple, b: tuple, dims: dict) -> list[dict]:
    """Per output tensor, {axis: Dim} for the axes whose sizes are the batch or sequence sizes of run `a` and change
    with them in run `b` ((batch, seq) sizes -> Dim in `dims`)."""
    out = []
    for x, y in zip(a, b):
        axes = {}
        for axis, (m, n) in enumerate(zip(x.shape, y.shape)):
            if (m, n) in dims:
                axes[axis] = dims[(m, n)]
            elif m != n:
                axes[axis] = torch.export.Dim.AUTO
        out.append(axes)
    return out


def layered_model(decoder, args: tuple, input_names, output_names, opset: int):
    """The decoder's ir.Model (as torch.onnx.export(..., optimize=False).model would hold it), assembled from pieces;
    raises NotLayered when it cannot be."""
    layers = list(decoder.lm.layers)
    n_ds = decoder.deepstack_layers
    if n_ds >= len(layers) and n_ds:
        raise NotLayered("every layer is a DeepStack layer")
    first = 4 if n_ds else 3
    head_args, past = tuple(args[:first]), args[first:]
    if len(past) != 2 * len(layers):
        raise NotLayered("the past inputs do not match the layers")
    b, s = head_args[0].shape[0], head_args[0].shape[1]
    bd, sd, pd = (torch.export.Dim(n) for n in ("batch_size", "sequence_length", "past_sequence_length"))

    # The head, run eagerly twice (other batch and sequence sizes) to learn which output axes vary with which input.
    head = _Head(decoder).eval()
    with torch.no_grad():
        h_out = head(*head_args)
        b2, s2 = b + 2, s + 4
        alt = (head_args[0].new_zeros(b2, s2, head_args[0].shape[2]),
               head_args[1].new_ones(b2, head_args[1].shape[1] + s2 - s),
               head_args[2][:, :1, :1].expand(3, b2, s2).contiguous(),
               *([head_args[3].new_zeros(n_ds, b2, s2, head_args[3].shape[3])] if n_ds else []))
        h_alt = head(*alt)
    dims = {(b, b2): bd, (s, s2): sd}
    out_dims = _varying_dims(h_out, h_alt, dims)
    n_pos = len(h_out) - 1 - n_ds
    # forward(*rest) takes the varargs as one tuple (as torch.export wants their dynamic shapes).
    head_shapes = ({0: bd, 1: sd}, {0: bd, 1: torch.export.Dim.AUTO}, {1: bd, 2: sd},
                   *([({1: bd, 2: sd},)] if n_ds else []))
    pieces: dict[str, Any] = {"head": trace_piece(head, head_args, head_shapes, opset, "head")}

    # One traced layer per kind: its position in `layers` of each kind's first layer.
    kind_of = [(i < n_ds, signature(layer)) for i, layer in enumerate(layers)]
    kinds = first_of_kind(kind_of)
    hidden = head_args[0]
    mask, pos = h_out[0], h_out[1: 1 + n_pos]
    for key, i in kinds.items():
        ds = key[0]
        step_args = (hidden, mask, *pos, past[2 * i], past[2 * i + 1], *([h_out[1 + n_pos + i]] if ds else []))
        step_shapes = ({0: bd, 1: sd}, out_dims[0], (*out_dims[1: 1 + n_pos], {0: bd, 2: pd}, {0: bd, 2: pd},
                                                      *([{0: bd, 1: sd}] if ds else [])))
        step = _Step(layers[i], n_pos, ds).eval()
        pieces[key] = trace_piece(step, step_args, step_shapes, opset, f"layer {i}" + (" (DeepStack)" if ds else ""))
    tail = _Tail(decoder).eval()
    pieces["tail"] = trace_piece(tail, (hidden,), ({0: bd, 1: sd},), opset, "tail")

    asm = Assembly(decoder, pieces)
    hg = pieces["head"].graph
    ins = [asm.new_input(v, n) for v, n in zip(hg.inputs, input_names[:first])]
    h_vals = asm.paste("head", head, ins, "head/")
    mask_v, pos_v, slice_v = h_vals[0], h_vals[1: 1 + n_pos], h_vals[1 + n_pos:]
    hidden_v = ins[0]
    presents = []
    for i, layer in enumerate(layers):
        key = kind_of[i]
        sg = pieces[key].graph
        pk = asm.new_input(sg.inputs[2 + n_pos], input_names[first + 2 * i])
        pv = asm.new_input(sg.inputs[3 + n_pos], input_names[first + 2 * i + 1])
        bound = [hidden_v, mask_v, *pos_v, pk, pv, *([slice_v[i]] if key[0] else [])]
        hidden_v, k, v = asm.paste(key, _Step(layer, n_pos, key[0]), bound, f"layers.{i}/", f"layer{kinds[key]}")
        k.name, v.name = output_names[1 + 2 * i], output_names[2 + 2 * i]
        presents += [k, v]
    (logits,) = asm.paste("tail", tail, [hidden_v], "tail/")
    logits.name = output_names[0]
    return asm.model([logits, *presents])


