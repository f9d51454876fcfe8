"""Graphs assembled from pieces traced once per kind of layer, not once per layer.

torch.onnx traces, decomposes and translates every layer of a stack again although the layers are the same code
with other weights: at Qwen2.5-VL-3B widths most of the export time before the first weight is written (36 decoder
layers; 32 vision blocks). Here a module is traced in pieces, each by torch.onnx exactly as the whole module would
be (dynamo, optimize=False): a head, one layer of each kind, a tail. The graph is then assembled from them
(`Assembly`): the head's nodes once, a copy of a layer's nodes per layer with that layer's parameters as its
initializers (named as the whole trace names them, e.g. `lm.layers.{i}.…`, `blocks.{i}.…`), the tail's nodes once.
What follows (optimize_graph, saving, the transforms) is the same as for the whole trace, and the graph computes what
the whole trace computes (tests/exporters/test_layered.py: the same outputs, bit for bit, on both families'
fixtures). Two users:
- `blockwise_model` here: a static-shape vision tower whose module says what its pieces are (`pieces()`);
- `exporters.layered_decoder.layered_model`: the text decoder with its mask, rotary, KV cache and DeepStack inputs.

Only layers that are the same are traced once: same class, same parameters (names, shapes, dtypes) and the same
plain attributes in every submodule (sliding-window layers, say, differ in `sliding_window` and are a kind of their
own; so do full-attention and windowed vision blocks). A layer no other layer matches is traced on its own. Anything
the assembly does not handle (a piece with a subgraph or a local function) raises `NotLayered`, and the caller traces
the whole module instead.
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


def first_of_kind(kind_of: list) -> dict:
    """Each kind in `kind_of` (one per layer) -> the index of its first layer: the one traced for that kind."""
    kinds: dict = {}
    for i, key in enumerate(kind_of):
        kinds.setdefault(key, i)
    return kinds


def trace_piece(module, args, dynamic_shapes, opset: int, what: str):
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


class Assembly:
    """One graph built from traced pieces: each piece's nodes copied in with its inputs bound to values already in
    the graph, its parameters and buffers as initializers named as the whole module names them (`whole`'s own
    parameter and buffer names, the first of tied ones), so the assembled graph's weights are the whole trace's."""

    def __init__(self, whole, pieces: dict) -> None:
        self.pieces = pieces
        self.full_names: dict[int, str] = {}
        for name, t in (*whole.named_parameters(), *whole.named_buffers()):
            self.full_names.setdefault(id(t), name)
        self.inputs: list = []
        self.initializers: dict[str, Any] = {}
        self.nodes: list = []

    def new_input(self, template, name: str):
        v = ir.Value(name=name, type=template.type, shape=template.shape.copy() if template.shape else None)
        self.inputs.append(v)
        return v

    def _initializer_for(self, tensor, fallback: str):
        from torch.onnx._internal.exporter._core import TorchTensor

        name = self.full_names.get(id(tensor), fallback)
        v = self.initializers.get(name)
        if v is None:
            v = ir.Value(name=name, const_value=TorchTensor(tensor, name=name))
            v.dtype = v.const_value.dtype
            v.shape = ir.Shape(tuple(tensor.shape))
            self.initializers[name] = v
        return v

    def paste(self, piece_key, module, bound: list, prefix: str, constants: str | None = None) -> list:
        """Copy piece `piece_key`'s nodes with its inputs bound to `bound`. Its initializers are `module`'s
        parameters/buffers of the same names (`module` is the piece traced, or one built the same way around
        another layer of its kind: that layer's weights) or constants the trace lifted (a mask's fill value), one
        per piece for every copy (named `<constants>.<name>`). Returns the copies' outputs."""
        g = self.pieces[piece_key].graph
        vmap = dict(zip(g.inputs, bound))
        params = dict(module.named_parameters(remove_duplicate=False))
        buffers = dict(module.named_buffers(remove_duplicate=False))
        for name, value in g.initializers.items():
            tensor = params.get(name, buffers.get(name))
            if tensor is not None:
                vmap[value] = self._initializer_for(tensor, prefix + name)
                continue
            cname = f"{constants or piece_key}.{name}"
            if cname not in self.initializers:
                self.initializers[cname] = ir.Value(name=cname, type=value.type, shape=value.shape,
                                                    const_value=value.const_value)
            vmap[value] = self.initializers[cname]
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
            self.nodes.append(new)
        return [vmap[v] for v in g.outputs]

    def model(self, outputs: list):
        opsets = {}
        for m in self.pieces.values():
            opsets.update(m.opset_imports)
        ref = self.pieces["head"]
        graph = ir.Graph(self.inputs, outputs, nodes=self.nodes, initializers=list(self.initializers.values()),
                         opset_imports=opsets, name=ref.graph.name)
        return ir.Model(graph, ir_version=ref.ir_version, producer_name=ref.producer_name,
                        producer_version=ref.producer_version)


def blockwise_model(module, args: tuple, input_names, output_names, opset: int):
    """A static-shape tower's ir.Model (as torch.onnx.export(..., optimize=False).model would hold it), assembled
    from pieces: `module.pieces()` gives (head, steps, tail), nn.Modules that compose to `module.forward`:

        x = head(*args); extras = []
        for step in steps: x, *e = step(x); extras += e      (a step returns (x,) or (x, extra))
        outputs = tail(x, *extras)

    Each holds the module's own submodules and buffers (no copies), so their initializers are named as the whole
    trace names them. A kind of step (`signature`: class, plain attributes, parameter names and shapes) is traced
    once. The example inputs of the steps and the tail are zeros of the shapes a run in FakeTensorMode gives: the
    weights (a streamed export's stand-ins) are never read. Raises NotLayered when the tower has no `pieces`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not hasattr(module, "pieces"):
        raise NotLayered(f"{type(module).__name__} is not made of pieces")
    head, steps, tail = module.pieces()
    head, tail, steps = head.eval(), tail.eval(), [s.eval() for s in steps]
    if not steps:
        raise NotLayered("the tower has no blocks")
    kind_of = [signature(step) for step in steps]
    kinds = first_of_kind(kind_of)

    def zeros(t):
        return torch.zeros(tuple(t.shape), dtype=t.dtype)

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        x = head(*args)
        step_out = {key: steps[i](x) for key, i in kinds.items()}
    x = zeros(x)
    extras = [zeros(e) for key in kind_of for e in step_out[key][1:]]
    pieces: dict[Any, Any] = {"head": trace_piece(head, tuple(args), None, opset, "head")}
    for key, i in kinds.items():
        pieces[key] = trace_piece(steps[i], (x,), None, opset, f"block {i}")
    pieces["tail"] = trace_piece(tail, (x, *extras), None, opset, "tail")

    asm = Assembly(module, pieces)
    ins = [asm.new_input(v, n) for v, n in zip(pieces["head"].graph.inputs, input_names)]
    (x_v,) = asm.paste("head", head, ins, "head/")
    extra_v = []
    for i, step in enumerate(steps):
        x_v, *e = asm.paste(kind_of[i], step, [x_v], f"blocks.{i}/", f"block{kinds[kind_of[i]]}")
        extra_v += e
    outputs = asm.paste("tail", tail, [x_v, *extra_v], "tail/")
    for v, name in zip(outputs, output_names):
        v.name = name
    return asm.model(outputs)
