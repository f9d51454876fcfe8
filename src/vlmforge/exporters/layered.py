"""A decoder traced once per kind of layer, not once per layer.

torch.onnx traces, decomposes and translates every decoder layer again although the layers are the same code with
other weights: at Qwen2.5-VL-3B widths most of the INT4 decoder's export time before its first weight is written
(36 layers). Here the decoder (`exporters.decoder.DecoderForExport`) is traced in pieces, each by torch.onnx exactly
as the whole module would be (dynamo, optimize=False):
- the head: the causal additive mask and the rotary position embeddings, from the graph's first inputs (and the
  DeepStack slices `deepstack_embeds[i]`);
- one layer of each kind: a plain layer, and a DeepStack layer (a layer followed by the addition of its slice);
- the tail: final norm and LM head.
The whole graph is then assembled from them: the head's nodes once, a copy of a layer's nodes per decoder layer with
that layer's parameters as its initializers (named as the whole trace names them, `lm.layers.{i}.…`), the tail's
nodes once. What follows (optimize_graph, saving, the transforms) is the same as for the whole trace. The graph
computes what the whole trace computes (tests/exporters/test_layered.py: the same outputs, bit for bit, on both
families' fixtures, tied and untied heads).

Only layers that are the same are traced once: same class, same parameters (names, shapes, dtypes) and the same
plain attributes in every submodule (sliding-window layers, say, differ in `sliding_window` and are a kind of their
own). A layer no other layer matches is traced on its own. Anything the assembly does not handle (a piece with a
subgraph or a local function) raises `NotLayered`, and the caller traces the whole module instead.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import onnx_ir as ir
import torch

from vlmforge.exporters.onnx_export import NotLayered, _forget_trace

log = logging.getLogger(__name__)


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
        from vlmforge.exporters.decoder import causal_mask

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


_PLAIN = (int, float, str, bool, type(None))


def _plain(value):
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return tuple(value)
    return None


def signature(layer) -> tuple:
    """What must be equal for two layers to be one traced piece: the class and plain attributes of every submodule
    (but `layer_idx`, which only names the cache slot) and every parameter's and buffer's name, shape and dtype."""
    parts = []
    for name, mod in layer.named_modules():
        attrs = tuple(sorted((k, _plain(v)) for k, v in vars(mod).items()
                             if not k.startswith("_") and k != "layer_idx" and _plain(v) is not None))
        parts.append((name, type(mod).__qualname__, attrs))
    tensors = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in
                    (*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False)))
    return tuple(parts), tensors


def _trace(module, args, dynamic_shapes, opset: int, what: str):
    t0 = time.perf_counter()
    n_in = len(args)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, None, input_names=[f"in{i}" for i in range(n_in)],
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                    external_data=True, optimize=False, verbose=False)
    _forget_trace()
    model = program.model
    if model.functions:
        raise NotLayered(f"the {what} piece has local functions")
    for node in model.graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise NotLayered(f"the {what} piece has a subgraph ({node.op_type})")
    log.debug("layered trace: %s in %.1f s (%d nodes)", what, time.perf_counter() - t0, len(model.graph))
    return model


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
    from torch.onnx._internal.exporter._core import TorchTensor

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
    pieces: dict[str, Any] = {"head": _trace(head, head_args, head_shapes, opset, "head")}

    # One traced layer per kind: its position in `layers` of each kind's first layer.
    kinds: dict[tuple, int] = {}
    kind_of: list[tuple] = []
    for i, layer in enumerate(layers):
        key = (i < n_ds, signature(layer))
        kinds.setdefault(key, i)
        kind_of.append(key)
    hidden = head_args[0]
    mask, pos = h_out[0], h_out[1: 1 + n_pos]
    steps = {}
    for key, i in kinds.items():
        ds = key[0]
        step_args = (hidden, mask, *pos, past[2 * i], past[2 * i + 1], *([h_out[1 + n_pos + i]] if ds else []))
        step_shapes = ({0: bd, 1: sd}, out_dims[0], (*out_dims[1: 1 + n_pos], {0: bd, 2: pd}, {0: bd, 2: pd},
                                                      *([{0: bd, 1: sd}] if ds else [])))
        step = _Step(layers[i], n_pos, ds).eval()
        pieces[key] = _trace(step, step_args, step_shapes, opset, f"layer {i}" + (" (DeepStack)" if ds else ""))
        steps[key] = step
    tail = _Tail(decoder).eval()
    pieces["tail"] = _trace(tail, (hidden,), ({0: bd, 1: sd},), opset, "tail")

    # Names as the whole trace gives them: the decoder's own parameter and buffer names (the first of tied ones).
    full_names = {}
    for name, t in (*decoder.named_parameters(), *decoder.named_buffers()):
        full_names.setdefault(id(t), name)

    graph_inputs: list = []
    initializers: dict[str, Any] = {}
    nodes: list = []

    def new_input(template, name):
        v = ir.Value(name=name, type=template.type, shape=template.shape.copy() if template.shape else None)
        graph_inputs.append(v)
        return v

    def initializer_for(tensor, fallback: str):
        name = full_names.get(id(tensor), fallback)
        v = initializers.get(name)
        if v is None:
            v = ir.Value(name=name, const_value=TorchTensor(tensor, name=name))
            v.dtype = v.const_value.dtype
            v.shape = ir.Shape(tuple(tensor.shape))
            initializers[name] = v
        return v

    def paste(piece_key, module, bound: list, prefix: str, owner=None):
        """Copy piece `piece_key`'s nodes with its inputs bound to `bound`; its initializers are `module`'s
        parameters/buffers by name (those of `owner`, a layer of the same kind, in their place) or its own
        constants (shared by every copy). Returns the copies' outputs."""
        model = pieces[piece_key]
        g = model.graph
        vmap = dict(zip(g.inputs, bound))
        params = dict(module.named_parameters(remove_duplicate=False))
        buffers = dict(module.named_buffers(remove_duplicate=False))
        for name, value in g.initializers.items():
            tensor = None
            if name in params or name in buffers:
                if owner is None:
                    tensor = params[name] if name in params else buffers[name]
                else:  # the same parameter of the layer this copy is (the piece traced another of its kind)
                    sub = name.split(".", 1)[1]
                    tensor = owner.get_parameter(sub) if name in params else owner.get_buffer(sub)
            if tensor is not None:
                vmap[value] = initializer_for(tensor, prefix + name)
            else:  # a constant the trace lifted (a mask's fill value): the same for every copy
                cname = f"{piece_key if isinstance(piece_key, str) else f'layer{kinds[piece_key]}'}.{name}"
                if cname not in initializers:
                    c = ir.Value(name=cname, type=value.type, shape=value.shape, const_value=value.const_value)
                    initializers[cname] = c
                vmap[value] = initializers[cname]
        for node in g:
            inputs = [vmap[v] if v is not None else None for v in node.inputs]
            new = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
                          num_outputs=len(node.outputs), version=node.version, name=prefix + (node.name or ""),
                          metadata_props=dict(node.metadata_props))
            for old, out in zip(node.outputs, new.outputs):
                out.name = prefix + old.name
                out.type = old.type
                out.shape = old.shape.copy() if old.shape is not None else None
                vmap[old] = out
            nodes.append(new)
        return [vmap[v] for v in g.outputs]

    hg = pieces["head"].graph
    ins = [new_input(v, n) for v, n in zip(hg.inputs, input_names[:first])]
    h_vals = paste("head", head, ins, "head/")
    mask_v, pos_v, slice_v = h_vals[0], h_vals[1: 1 + n_pos], h_vals[1 + n_pos:]
    hidden_v = ins[0]
    presents = []
    for i, layer in enumerate(layers):
        key = kind_of[i]
        sg = pieces[key].graph
        pk = new_input(sg.inputs[2 + n_pos], input_names[first + 2 * i])
        pv = new_input(sg.inputs[3 + n_pos], input_names[first + 2 * i + 1])
        bound = [hidden_v, mask_v, *pos_v, pk, pv, *([slice_v[i]] if key[0] else [])]
        hidden_v, k, v = paste(key, steps[key], bound, f"layers.{i}/", owner=layer)
        k.name, v.name = output_names[1 + 2 * i], output_names[2 + 2 * i]
        presents += [k, v]
    (logits,) = paste("tail", tail, [hidden_v], "tail/")
    logits.name = output_names[0]
    opsets = {}
    for m in pieces.values():
        opsets.update(m.opset_imports)
    graph = ir.Graph(graph_inputs, [logits, *presents], nodes=nodes, initializers=list(initializers.values()),
                     opset_imports=opsets, name=hg.name)
    ref = pieces["head"]
    return ir.Model(graph, ir_version=ref.ir_version, producer_name=ref.producer_name,
                    producer_version=ref.producer_version)
