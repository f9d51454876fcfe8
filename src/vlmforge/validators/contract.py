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
    stage = contract.stage
    try:
        onnx.checker.check_model(str(path), full_check=False)
        checker = CheckResult(stage, "onnx.checker", "errors", 0, 0, True)
    except onnx.checker.ValidationError as exc:
        checker = CheckResult(stage, "onnx.checker", "errors", 1, 0, False, str(exc).splitlines()[0][:300])
    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = graph_io(model)
    problems = diff_contract(inputs, contract.inputs, "input") + diff_contract(outputs, contract.outputs, "output")
    io = CheckResult(stage, "io matches contract", "mismatches", len(problems), 0, not problems, "; ".join(problems)[:2000])
    return [checker, io]
