"""PyTorch running the weights a transformed graph holds: the graph check for INT4 stages.

Why: an INT4 graph compared with the FP32 model measures quantization noise plus any graph error, and on
random weights the noise alone is large (logits mean cosine 0.81-0.93), so no tolerance can tell a broken
INT4 graph from a correct one. With every quantized weight dequantized back into the PyTorch model, both
sides compute the same function; what is left is the kernels' rounding (MatMulNBits at accuracy_level 4
quantizes activations to int8 per block), and a tight tolerance holds on any weights.

Layout (onnxruntime MatMulNBits, written by transforms/quantize_int4.py): B [N, K/block, block/2] uint8,
two 4-bit values per byte, low nibble first, along K; scales [N * K/block] (or [N, K/block]) float; an
optional zero_points input, 4-bit packed [N, ceil(K/block / 2)] (absent: symmetric, zero point 8).
W[n, k] = (q - zp) * scale: [N, K], the torch nn.Linear layout.

The quantized graph's weight `<w>_Q4` came from the FP32 initializer `<w>` ([K, N] = W^T); the INT4 transform
records a fingerprint of each such initializer (core.hashing.array_fingerprint; its record's `source_weights`),
and the PyTorch Linear it belongs to is the one whose W^T has that fingerprint, so no family naming is read and no
FP32 graph is needed (a streamed INT4 decoder has none). Tensors are read one at a time from the graph's external data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from vlmforge.core.hashing import array_fingerprint

log = logging.getLogger(__name__)
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


def read_tensor(path: Path, tensor: onnx.TensorProto) -> np.ndarray:
    """One initializer of the graph at `path` (its external bytes read alone, confined to its folder)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    from vlmforge.transforms.external import external_file

    file, offset, length = external_file(path, tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    with open(file, "rb") as fh:
        fh.seek(offset)
        data = np.frombuffer(fh.read(length or count * np.dtype(dtype).itemsize), dtype=dtype)
    return data.reshape(tuple(tensor.dims))


CHUNK_BYTES = 32 << 20  # float32 rows dequantized at a time (temporaries ~8x this); an lm_head [151936, 2048] is 1.2 GB


@dataclass(frozen=True)
class QuantizedLinear:
    """One MatMulNBits node's packed weight, dequantized a block of rows at a time (`rows`), so the float copies
    and temporaries of a vocab-sized head never exist whole (all at once they were ~10x the weight's bytes)."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    block: int

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """([stop - start, K] float32 weight rows, the quantization step of each element)."""
        blocks = -(-self.k // self.block)
        w = self.weight_rows(start, stop)
        scales = self.scales.astype(np.float32, copy=False).reshape(self.n, blocks)[start:stop]
        step = np.broadcast_to(np.abs(scales)[..., None], (stop - start, blocks, self.block))
        return w, step.reshape(stop - start, blocks * self.block)[:, :self.k]

    def weight_rows(self, start: int, stop: int) -> np.ndarray:
        """[stop - start, K] float32 weight rows: (nibble - zero point) x scale, the kernel's arithmetic."""
        blocks = -(-self.k // self.block)
        packed = self.b.reshape(self.n, blocks, self.block // 2)[start:stop]
        m = stop - start
        nibbles = np.empty((m, blocks, self.block // 2, 2), np.uint8)  # low nibble first
        np.bitwise_and(packed, 0x0F, out=nibbles[..., 0])
        np.right_shift(packed, 4, out=nibbles[..., 1])
        w = nibbles.reshape(m, blocks, self.block).astype(np.float32)
        if self.zero_points is None:
            w -= np.float32(8.0)
        else:
            zpk = self.zero_points.reshape(self.n, -1)[start:stop]
            zp = np.stack([zpk & 0x0F, zpk >> 4], -1).reshape(m, -1)[:, :blocks].astype(np.float32)
            w -= zp[..., None]
        w *= self.scales.astype(np.float32, copy=False).reshape(self.n, blocks)[start:stop][..., None]
        return w.reshape(m, blocks * self.block)[:, :self.k]

    def dequantize(self, out: np.ndarray | None = None) -> np.ndarray:
        """The [N, K] float32 weight (into `out` when given), a block of rows at a time."""
        weight = np.empty((self.n, self.k), np.float32) if out is None else out
        for start, stop in self.chunks():
            weight[start:stop] = self.weight_rows(start, stop)
        return weight

    def chunks(self):
        """(start, stop) row ranges of about CHUNK_BYTES of float32 each."""
        per = max(1, CHUNK_BYTES // (4 * max(self.k, 1)))
        return ((i, min(i + per, self.n)) for i in range(0, self.n, per))


def dequantize_matmul_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
                            block: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, K] float32 weight a MatMulNBits node (bits=4) multiplies by, [N, K] the step of each element)."""
    return QuantizedLinear(b, scales, zero_points, k, n, block).rows(0, n)


def quantized_weights(graph: Path):
    """(FP32 initializer name, QuantizedLinear) per MatMulNBits node of `graph`, one at a time;
    GatherBlockQuantized nodes are yielded with None (not dequantized here)."""
    model = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if node.op_type != "MatMulNBits":
            yield node.input[0], None
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4:
            yield node.input[1], None
            continue
        b, scales = read_tensor(graph, inits[node.input[1]]), read_tensor(graph, inits[node.input[2]])
        zp = read_tensor(graph, inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        name = node.input[1].removesuffix("_Q4")
        yield name, QuantizedLinear(b, scales, zp, attrs["K"], attrs["N"], attrs["block_size"])


def dequantize_checked(q: QuantizedLinear, original: np.ndarray) -> tuple[np.ndarray, float]:
    """([N, K] dequantized weight, the largest |dequantized - FP32| in quantization steps), block by block of
    rows: besides the result, only one block's temporaries are alive. `original` is the FP32 [K, N] initializer."""
    weight = np.empty((q.n, q.k), np.float32)
    steps = 0.0
    for start, stop in q.chunks():
        w, step = q.rows(start, stop)
        weight[start:stop] = w
        err = np.abs(w - original.T[start:stop])
        off = np.where(step > 0, err / np.where(step > 0, step, 1), np.where(err > 0, np.float32(np.inf), 0))
        steps = max(steps, float(off.max()))
    return weight, steps


def load_into(model, graph: Path, sources: dict[str, str]) -> tuple[int, list[str], float]:
    """Replace, in `model`, every Linear weight that `graph` quantized by its dequantized value (a new
    Parameter per Linear: a tied embedding keeps its float table). `sources`: the FP32 weight name of each
    quantized one -> the array_fingerprint of that FP32 [K, N] weight (the INT4 transform's record); the Linear whose
    weight, transposed, has that fingerprint is the one replaced, so no family naming is read and no FP32 graph is
    needed. Returns (weights replaced, the names of quantized weights no PyTorch Linear matches, the largest
    |dequantized - FP32| in quantization steps, measured against the matched PyTorch weight).

    The last is the weights' own check: round-to-nearest keeps every element within one step (half a step,
    one at the clipped end of the range); scales, zero points or nibbles in the wrong place are several
    steps off, on any weights. The graph check (same weights on both sides) cannot see those.

    A layer-streamed model (vlmforge.loading.streamed_model): a streamed block's weights are matched (and their
    steps measured) by reading each block once, and replaced by an override that dequantizes the packed INT4
    weight (kept, 1/8 of the FP32 bytes) whenever the block is read: the dequantized weights are never all in
    memory."""
    import functools

    import torch

    stream = getattr(model, "_vlmforge_stream", None)
    wanted: dict[str, list] = {}  # digest -> [(FP32 name, QuantizedLinear)]
    unmatched = []
    for name, q in quantized_weights(graph):
        digest = sources.get(name)
        if q is None or digest is None:
            unmatched.append(name)
        else:
            wanted.setdefault(digest, []).append((name, q))
    found: set[str] = set()
    replaced, steps = 0, 0.0
    for target, weight in _linear_weights(model, stream):  # a streamed block is resident only inside the loop
        matches = wanted.get(array_fingerprint(weight.detach().T.numpy()))
        if not matches:
            continue
        name, q = matches[0]
        found.update(n for n, _ in matches)
        dequantized, off = dequantize_checked(q, weight.detach().T.numpy())
        steps = max(steps, off)
        if stream is not None and _in_block(target, stream):
            del dequantized
            stream.overrides[target] = functools.partial(lambda q, out: q.dequantize(out.numpy()), q)
        else:
            model.get_submodule(target.rpartition(".")[0]).weight = torch.nn.Parameter(
                torch.from_numpy(dequantized), requires_grad=False)
        replaced += 1
    unmatched += sorted(n for ms in wanted.values() for n, _ in ms if n not in found)
    log.info("%s: %d quantized weights loaded into the PyTorch model (%d unmatched)", graph.name, replaced,
             len(unmatched))
    return replaced, unmatched, steps


def _in_block(name: str, stream) -> bool:
    return any(name.startswith(prefix) for prefix in stream.blocks)


def _linear_weights(model, stream):
    """(parameter name, weight) of every float32 nn.Linear of `model`; a streamed model's blocks are read one at
    a time for it (each weight is only looked at inside the loop)."""
    import torch

    def linears(root, prefix=""):
        for name, module in root.named_modules(prefix=prefix.rstrip(".")):
            if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32 \
                    and module.weight.device.type != "meta":
                yield f"{name}.weight", module.weight

    if stream is None:
        yield from linears(model)
        return
    for name, weight in linears(model):  # the resident part (a block's are on meta here)
        if not _in_block(name, stream):
            yield name, weight
    for prefix in stream.blocks:
        with stream.resident(prefix) as block:
            yield from linears(block, prefix)
