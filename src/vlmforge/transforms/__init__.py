"""ONNX -> ONNX precision transforms with declared parameters; each returns a JSON record of what it did.

`TRANSFORMS` is the one list: precision name -> the row below. The recipe's precisions (`config.PRECISIONS`),
the build's transform nodes (`build.plan`), their cache keys (`codekey.transform_code`) and the target
checks all read it, so adding a transform is one file in this folder and one row here.

A row names its function as a "module:function" string, resolved only when a build uses the precision:
importing this table (the recipe schema does, and so does the torch-free runtime through it) loads no ONNX
code. tests/transforms/test_table.py resolves every row.

The function is called as `function(src, dst, **params, **context)`: `src` the FP32 graph, `dst` the graph to
write (external data beside it), `params` the recipe values the row declares (function keyword -> key of
`precision.*`; exactly these enter the cache key), `context` the facts of the build it asks for by name:

    stage  the stage being transformed ("vision", "embedding", "decoder")
    vocab  the vocabulary size for the decoder (its lm_head's output width); None for the other stages

A row with `on_export` can also run inside the export (build.plan fuses it where the validation needs no FP32
graph of the stage): the FP32 graph is then never written, its weights read from the checkpoint once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

CONTEXT = ("stage", "vocab")  # what a transform may ask the build for (see above)


@dataclass(frozen=True)
class Transform:
    function: str  # "module:function", called as function(src, dst, **params, **context)
    params: dict = field(default_factory=dict)  # function keyword -> precision.<key> it is given (and keyed on)
    context: tuple[str, ...] = ()  # names from CONTEXT
    check: str | None = None  # "module:function", called as check(**params, where=...) before any work
    float16_io: str | None = None  # the boolean param that, when true, makes the graph's inputs/outputs float16
    # "module:function" applying the same transform to an export as it is saved (exporters.onnx_export.
    # transformed_on_save): function(structure, src, dst, **params, **context), src a saved graph's path or a
    # streamed export's StandInData; the bytes written are function's (src, dst) ones. None: run after the export.
    on_export: str | None = None

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]

    def resolve(self) -> Callable:
        return resolve(self.function)

    def resolve_on_export(self) -> Callable | None:
        return resolve(self.on_export) if self.on_export else None

    def resolve_check(self) -> Callable | None:
        return resolve(self.check) if self.check else None


def resolve(ref: str) -> Callable:
    """The function a "module:function" string names (ImportError / AttributeError if it names none)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


TRANSFORMS: dict[str, Transform] = {
    "fp16": Transform("vlmforge.transforms.cast_fp16:cast_fp16", params={"fp16_io": "fp16_io"},
                      float16_io="fp16_io"),
    "int4": Transform("vlmforge.transforms.quantize_int4:quantize_int4", params={"cfg": "int4"},
                      context=("vocab", "stage"), check="vlmforge.transforms.quantize_int4:check_int4_config",
                      on_export="vlmforge.transforms.quantize_int4:quantize_structure"),
}
