"""The TRANSFORMS table: every row resolves, the recipe's precisions are the table's, importing it loads no
ONNX code, and a transform added as one file plus one row builds, is keyed on its own code, and is cached."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import compose
from vlmforge.transforms import CONTEXT, TRANSFORMS, Transform


def test_every_row_resolves_to_a_function_taking_its_declared_parameters():
    import inspect

    for name, row in TRANSFORMS.items():
        fn = row.resolve()
        accepted = set(inspect.signature(fn).parameters)
        assert set(row.params) | set(row.context) <= accepted, name
        assert set(row.context) <= set(CONTEXT), name
        if row.check:
            assert set(row.params) | {"where"} <= set(inspect.signature(row.resolve_check()).parameters), name
        if row.float16_io:
            assert row.float16_io in row.params, name


def test_the_recipe_precisions_are_the_tables():
    from vlmforge.config import PRECISIONS

    assert PRECISIONS == ("fp32", *TRANSFORMS)


def test_importing_the_table_and_the_schema_loads_no_onnx_or_torch():
    code = ("import sys, vlmforge.config, vlmforge.transforms; "
            "print([m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'torch')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bad_row_fails_before_any_work(work_dirs, qwen25_392, monkeypatch):
    from vlmforge.build import cache_keys

    monkeypatch.setitem(TRANSFORMS, "typo", Transform("vlmforge.transforms.cast_fp16:cast_fp61"))
    cfg = compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", "model=tiny_qwen2_5_vl")
    cfg.precision.decoder = "typo"
    with pytest.raises(AttributeError, match="cast_fp61"):
        cache_keys(cfg)


COPY = '''
import shutil


def copy_graph(src, dst, *, note, stage):
    """The identity transform: the FP32 graph, unchanged."""
    shutil.copyfile(src, dst)
    if src.with_name(src.name + ".data").exists():
        shutil.copyfile(src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data"))
    return {"transform": "copy_graph", "stage": stage, "note": note}
'''


def test_a_transform_added_as_a_file_and_a_row_builds_and_is_cached(work_dirs, qwen25_392, tmp_path, monkeypatch):
    from vlmforge.build import cache_keys, run_build

    (tmp_path / "throwaway_copy.py").write_text(textwrap.dedent(COPY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(TRANSFORMS, "copy", Transform("throwaway_copy:copy_graph", params={"note": "fp16_io"},
                                                      context=("stage",)))
    cfg = compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", "model=tiny_qwen2_5_vl",
                  "vision=small", "name=copy-decoder", "validate.enabled=false")
    cfg.precision.decoder = "copy"
    cfg.target.precisions = [*cfg.target.precisions, "copy"]

    report = run_build(cfg)
    assert report.cache == {"vision": "cached", "embedding": "cached", "decoder": "transformed", "validation": "off"}
    fp32 = qwen25_392.directory
    assert (report.directory / "decoder.onnx").read_bytes() == (fp32 / "decoder.onnx").read_bytes()
    component = json.loads((report.directory / "manifest.json").read_text())["components"]["decoder"]
    assert component["precision"] == "copy"
    assert component["transform"]["note"] is False and component["transform"]["stage"] == "decoder"
    assert component["transform"]["size_ratio"] == 1.0

    keys = cache_keys(cfg)
    entry = work_dirs["cache"] / "stages" / "qwen2_5_vl" / "decoder.copy" / keys["final"]["decoder"] / "entry.json"
    inputs = json.loads(entry.read_text())["inputs"]
    assert inputs["row"]["function"] == "throwaway_copy:copy_graph" and inputs["params"] == {"fp16_io": False}
    assert inputs["deps"] == {"export.decoder": keys["export"]["decoder"]}
    assert keys["export"] == cache_keys(compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}",
                                                "model=tiny_qwen2_5_vl", "vision=small"))["export"]

    again = run_build(cfg)
    assert again.cache["decoder"] == "cached" and not again.model_loaded

    with open(tmp_path / "throwaway_copy.py", "a") as f:  # its code is in its key
        f.write("\n# an edit\n")
    edited = cache_keys(cfg)
    assert edited["final"]["decoder"] != keys["final"]["decoder"] and edited["export"] == keys["export"]
