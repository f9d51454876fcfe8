"""Contract check: graph I/O names, dtypes and dims equal the stage's declared contract; onnx.checker passes."""

from __future__ import annotations

from pathlib import Path

import onnx

from vlmforge.core.contracts import StageContract, TensorSpec, diff_contract
from vlmforge.validators.results import CheckResult

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.UINT8: "uint8",
}


def graph_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def spec(v) -> TensorSpec:
        tt = v.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim)
        return TensorSpec(v.name, _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), dims)

    inits = {i.name for i in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def check_contract(path: Path, contract: StageContract) -> list[CheckResult]:
    """onnx.checker on the graph structure plus our own check of every external tensor's bytes, then the
    I/O against the contract.

    Why not `onnx.checker.check_model(path)`: it refuses external data files with more than one hard link
    ("potential hardlink attack"), and stage outputs are hardlinks into the build cache. The structure (a
    few MB whatever the weights weigh) is checked in memory instead, and external_data_problems() checks
    what the path-based checker would have: each tensor's file is a plain file in the graph's folder and
    holds exactly the bytes its dtype and dims need. Nothing is read but file sizes."""
    stage = contract.stage
    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.checker.check_model(_external_as_empty(model), full_check=False)
        errors = external_data_problems(Path(path), model)
    except onnx.checker.ValidationError as exc:
        errors = [str(exc).splitlines()[0][:300]]
    checker = CheckResult(stage, "onnx.checker", "errors", len(errors), 0, not errors, "; ".join(errors)[:2000])
    inputs, outputs = graph_io(model)
    problems = diff_contract(inputs, contract.inputs, "input") + diff_contract(outputs, contract.outputs, "output")
    io = CheckResult(stage, "io matches contract", "mismatches", len(problems), 0, not problems, "; ".join(problems)[:2000])
    return [checker, io]


def _external_as_empty(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the structure in which every external tensor is a 0-element tensor of its dtype: the
    in-memory checker would otherwise open the data files relative to the working directory. Shapes of
    initializers do not enter a non-full check; their bytes are checked by external_data_problems()."""
    from vlmforge.transforms.external import external_tensors

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in external_tensors(out):
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        del t.dims[:]
        t.dims.append(0)
    return out


_FOUR_BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def external_data_problems(path: Path, model: onnx.ModelProto) -> list[str]:
    """One line per external tensor whose data file is not a plain file beside the graph, or whose byte
    range is not inside that file, or whose length is not what its dtype and dims need."""
    from vlmforge.core.errors import ArtifactError
    from vlmforge.transforms.external import external_file, external_tensors

    problems = []
    for t in external_tensors(model):
        try:
            file, offset, length = external_file(path, t)
        except ArtifactError as err:
            problems.append(err.what)
            continue
        n = 1
        for d in t.dims:
            n *= d
        need = (n + 1) // 2 if t.data_type in _FOUR_BIT else n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        size = file.stat().st_size
        if length is not None and length != need:
            problems.append(f"tensor {t.name!r} declares {length} bytes, its dtype and dims need {need}")
        elif offset + need > size:
            problems.append(f"tensor {t.name!r} needs bytes [{offset}, {offset + need}) of {file.name}, "
                            f"which has {size}")
    return problems
