"""INT4 weight-only quantization (MatMulNBits; GatherBlockQuantized for the embedding table).

Parameters are declared in the recipe (precision.int4.*) and checked before any work starts. Weights whose
input dimension is not a multiple of the block size are left in float and listed in the record, never
handed to the quantizer (which otherwise pads or crashes inside the library).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from vlmforge.core.errors import RecipeError
from vlmforge.core.hashing import array_fingerprint
from vlmforge.exporters import onnx_export
from vlmforge.exporters.onnx_export import normalize_model
from vlmforge.transforms.external import load_structure, read_array, save_like_onnx
from vlmforge.transforms.graph import weight_matmuls

log = logging.getLogger(__name__)

ALGORITHMS = ("default", "hqq")
BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def check_int4_config(cfg, where: str) -> None:
    """Reject what the quantizer cannot do, naming the recipe key and the valid choices."""
    if cfg.algorithm not in ALGORITHMS:
        raise RecipeError(f"precision.int4.algorithm={cfg.algorithm!r} is not a supported algorithm", where=where,
                          fix=f"use one of {list(ALGORITHMS)} (GPTQ/AWQ need calibration data and are not wired)")
    if cfg.block_size not in BLOCK_SIZES:
        raise RecipeError(f"precision.int4.block_size={cfg.block_size} cannot be used by MatMulNBits here", where=where,
                          fix=f"use one of {list(BLOCK_SIZES)}")
    if cfg.accuracy_level not in ACCURACY_LEVELS:
        raise RecipeError(f"precision.int4.accuracy_level={cfg.accuracy_level}", where=where,
                          fix=f"use one of {list(ACCURACY_LEVELS)} (4 = int8 compute, fastest on CPU)")
    if cfg.algorithm == "hqq" and cfg.symmetric:
        raise RecipeError("precision.int4.algorithm=hqq is asymmetric by construction", where=where,
                          fix="set precision.int4.symmetric=false with hqq")


def _lm_head(model: onnx.ModelProto, vocab: int | None) -> set[str]:
    return {n.name for n, (k, nn) in weight_matmuls(model) if vocab is not None and nn == vocab}


def quantize_int4(src: Path, dst: Path, cfg, *, vocab: int | None = None, stage: str = "decoder") -> dict:
    """Quantize `src` to `dst` one weight at a time: the graph structure is loaded without its weights,
    each weight is read from the FP32 data file when the quantizer reaches it, and the output is written
    tensor by tensor (transforms.external.save_like_onnx). Memory: the INT4 tensors (1/8 of the FP32
    bytes) and one FP32 weight, never the FP32 graph; the bytes are those of quantizing the loaded graph."""
    return quantize_structure(load_structure(src), Path(src), Path(dst), cfg, vocab=vocab, stage=stage)


def quantize_structure(model: onnx.ModelProto, src, dst: Path, cfg, *, vocab: int | None = None,
                       stage: str = "decoder") -> dict:
    """quantize_int4 of a graph structure whose external tensors are read from `src` (a saved FP32 graph's path, or
    a streamed export's transforms.external.StandInData: then the FP32 graph is never written). The record keeps,
    besides what was done, `source_weights`: for each quantized MatMul weight, the fingerprint of the FP32 [K, N]
    weight it came from (core.hashing.array_fingerprint), by which the validation finds that weight in the PyTorch
    model."""
    inits = {t.name: t for t in model.graph.initializer}
    digests = {t.name: array_fingerprint(read_array(t, src))
               for t in (inits.get(n.input[1]) for n, _ in weight_matmuls(model))
               if t is not None and not uses_external_data(t)}
    with _weights_from(src, digests, _reading_order(model, inits)):
        out, excluded = quantize_model(model, cfg, vocab)
    # Quantized tensors are in memory, the others still in the FP32 data file (or the checkpoint).
    save_like_onnx(normalize_model(out), src, Path(dst), onnx_export.EXTERNAL_DATA_THRESHOLD)
    quantized = sorted(n.name for n in out.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    gathers = [n.name for n in out.graph.node if n.op_type == "GatherBlockQuantized"]
    sources = {}
    for n in out.graph.node:
        name = n.input[1].removesuffix("_Q4") if n.op_type == "MatMulNBits" else None
        if name in digests:
            sources[name] = digests[name]
    return {
        "transform": "quantize_int4",
        "stage": stage,
        "algorithm": cfg.algorithm,
        "block_size": cfg.block_size,
        "symmetric": cfg.symmetric if cfg.algorithm == "default" else False,
        "accuracy_level": cfg.accuracy_level,
        "quantize_lm_head": cfg.quantize_lm_head,
        "quantize_embedding": cfg.quantize_embedding,
        "quantized_nodes": len(quantized),
        "embedding_tables_quantized": len(gathers),
        "kept_float": dict(sorted(excluded.items())),
        "source_weights": dict(sorted(sources.items())),
    }


def _reading_order(model: onnx.ModelProto, inits: dict) -> list:
    """The initializers the quantizer reads, in the order it visits their nodes (MatMul weights, Gather tables);
    a guess used only to read ahead: a weight it skips is dropped, one it asks for out of order is read then."""
    wanted = ((n.input[1] if n.op_type == "MatMul" else n.input[0]) for n in model.graph.node
              if n.op_type in ("MatMul", "Gather") and len(n.input) == 2)
    return [inits[name] for name in wanted if name in inits]


def quantize_model(model: onnx.ModelProto, cfg, vocab: int | None) -> tuple[onnx.ModelProto, dict[str, str]]:
    """onnxruntime's MatMulNBits quantizer over `model` as the recipe declares it; returns the quantized
    model and the weights kept float, with why."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    candidates = weight_matmuls(model)
    lm_head = _lm_head(model, vocab)
    excluded = {n.name: "lm_head kept float (precision.int4.quantize_lm_head=false)" for n, _ in candidates
                if n.name in lm_head and not cfg.quantize_lm_head}
    for n, (k, _) in candidates:
        if k % cfg.block_size and n.name not in excluded:
            excluded[n.name] = f"input dim {k} is not a multiple of block size {cfg.block_size}"
    op_types = ("MatMul", "Gather") if cfg.quantize_embedding else ("MatMul",)
    if cfg.algorithm == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4, op_types_to_quantize=op_types)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                            accuracy_level=cfg.accuracy_level, op_types_to_quantize=op_types)
    quant = MatMulNBitsQuantizer(model, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 accuracy_level=cfg.accuracy_level, nodes_to_exclude=sorted(excluded),
                                 algo_config=algo)
    quant.process()
    out = quant.model.model
    if cfg.algorithm == "hqq" or cfg.accuracy_level:
        for node in out.graph.node:  # HQQ's config has no accuracy_level; set the declared one on every node
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", cfg.accuracy_level))
    return out, excluded


@contextmanager
def _weights_from(src, digests: dict | None = None, order: list | None = None):
    """Scoped patch: the quantizer reads each weight with `onnx_ir.from_proto(t).numpy()` (MatMul) or
    `onnx.numpy_helper.to_array(t)` (HQQ, Gather), which for an external tensor resolve its file against the
    working directory (and onnx refuses the cache's hardlinked files). Read external tensors from `src`
    instead (the graph's own folder, by offset, or a streamed export's StandInData), leaving the tensor a
    reference: the FP32 weights are never all in memory, only the one being quantized and the next.

    Reads run in one thread beside the quantizer, one weight ahead in `order` (the external tensors in the order
    the quantizer visits them): reading and casting the next weight from the checkpoint, and hashing it, release
    the GIL. Each float32 matrix read is hashed into `digests` (name -> array_fingerprint) there. One thread does every
    read, so the stand-ins' buffers are never shared. Measured at 3B widths, 8 layers: 24.4 s against 24.6 s with
    the reads on the main thread; onnxruntime's block quantizer already keeps both cores of this box busy."""
    from concurrent.futures import ThreadPoolExecutor

    import onnx_ir
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from_proto, to_array = onnx_ir.from_proto, numpy_helper.to_array
    order = [t for t in order or () if uses_external_data(t)]
    position = {t.name: i for i, t in enumerate(order)}
    worker, ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmforge-int4-read"), {}
    waited = [0.0]

    def load(proto):
        array = read_array(proto, src)
        hashed = digests is not None and array.dtype == np.float32 and array.ndim == 2
        return array, array_fingerprint(array) if hashed else None

    def read(proto):
        future = ahead.pop(proto.name, None) or worker.submit(load, proto)
        i = position.get(proto.name)
        if i is not None:
            for skipped in [n for n in ahead if position[n] < i]:  # read ahead but not asked for: drop
                del ahead[skipped]
            if i + 1 < len(order) and order[i + 1].name not in ahead:
                ahead[order[i + 1].name] = worker.submit(load, order[i + 1])
        t = time.perf_counter()
        array, digest = future.result()
        waited[0] += time.perf_counter() - t
        if digest is not None:
            digests[proto.name] = digest
        return array

    def _from_proto(proto, *args, **kwargs):
        if isinstance(proto, onnx.TensorProto) and uses_external_data(proto):
            return onnx_ir.tensor(read(proto), name=proto.name)
        return from_proto(proto, *args, **kwargs)

    def _to_array(tensor, *args, **kwargs):
        return read(tensor) if uses_external_data(tensor) else to_array(tensor, *args, **kwargs)

    onnx_ir.from_proto, numpy_helper.to_array = _from_proto, _to_array
    try:
        yield
    finally:
        onnx_ir.from_proto, numpy_helper.to_array = from_proto, to_array
        log.debug("int4: %.1f s waiting for weights to be read", waited[0])
        ahead.clear()
        worker.shutdown(wait=True, cancel_futures=True)
