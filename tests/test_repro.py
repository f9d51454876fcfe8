"""vlmforge.repro: the comparison behind `make repro-check`, tested on copies of the session build (a real
double build takes a minute and runs in `make repro-check`, not here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from vlmforge.core.errors import ArtifactError
from vlmforge.repro import (DEBUG_METADATA_PREFIXES, compare_dirs, json_diff, main, normalize_model,
                            recorded_recipe)


@pytest.fixture
def twins(qwen25_392, tmp_path) -> tuple[Path, Path]:
    return (shutil.copytree(qwen25_392.directory, tmp_path / "a" / "set"),
            shutil.copytree(qwen25_392.directory, tmp_path / "b" / "set"))


def _debug_keys(model: onnx.ModelProto) -> set[str]:
    return {p.key for n in model.graph.node for p in n.metadata_props if p.key.startswith(DEBUG_METADATA_PREFIXES)}


def test_compare_dirs_reports_identical_copies(twins):
    report = compare_dirs(*twins)
    assert report.ok and not report.differing
    assert {r.path for r in report.rows} >= {"manifest.json", "vision.onnx", "embedding.onnx", "decoder.onnx"}
    assert report.table().endswith("reproducible: yes (byte-identical)")


def test_compare_dirs_names_manifest_keys_that_differ(twins):
    a, b = twins
    data = json.loads((b / "manifest.json").read_text())
    data["recipe"]["out_dir"] = "/somewhere/else"
    (b / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    report = compare_dirs(a, b)
    assert not report.ok
    [row] = report.differing
    assert row.path == "manifest.json" and row.status == "differs"
    assert row.detail == "JSON keys differ: recipe.out_dir"
    assert "reproducible: NO (1 of" in report.table()


def test_compare_dirs_reports_files_on_one_side_only(twins):
    a, b = twins
    (b / "tokenizer.json").unlink()
    (b / "extra.txt").write_text("x")
    rows = {r.path: r.status for r in compare_dirs(a, b).differing}
    assert rows == {"tokenizer.json": "only in A", "extra.txt": "only in B"}


def test_compare_dirs_explains_onnx_stack_trace_paths(twins):
    """What differs between builds from two checkouts: absolute paths in torch's per-node stack traces."""
    a, b = twins
    model = onnx.load(str(b / "vision.onnx"))
    # Saved graphs carry no stack traces any more (save_model strips them); put one back as torch writes it.
    assert "pkg.torch.onnx.stack_trace" not in _debug_keys(model)
    model.graph.node[0].metadata_props.add(key="pkg.torch.onnx.stack_trace",
                                           value='File "/elsewhere/src/vlmforge/families/x.py", line 1')
    onnx.save(model, str(b / "vision.onnx"))
    [row] = [r for r in compare_dirs(a, b).differing if r.path == "vision.onnx"]
    assert "pkg.torch.onnx.stack_trace" in row.detail
    assert "identical after normalize_model" in row.detail


def test_compare_dirs_says_when_normalize_is_not_enough(twins):
    a, b = twins
    model = onnx.load(str(b / "embedding.onnx"))
    model.graph.node[0].name += "_renamed"
    onnx.save(model, str(b / "embedding.onnx"))
    [row] = [r for r in compare_dirs(a, b).differing if r.path == "embedding.onnx"]
    assert "node names/order" in row.detail and "still differs after normalize_model" in row.detail


def test_normalize_model_strips_only_debug_metadata(qwen25_392):
    model = onnx.load(str(qwen25_392.directory / "decoder.onnx"))
    model.graph.node[0].metadata_props.add(key="my.note", value="kept")
    before = onnx.ModelProto()
    before.CopyFrom(model)
    normalize_model(model)
    assert not _debug_keys(model)
    assert [(p.key, p.value) for p in model.graph.node[0].metadata_props] == [("my.note", "kept")]
    for m in (before, model):  # with all graph/node/value metadata gone, the two models are the same proto
        del m.graph.metadata_props[:]
        for n in m.graph.node:
            del n.metadata_props[:]
        for v in (*m.graph.value_info, *m.graph.input, *m.graph.output, *m.graph.initializer):
            del v.metadata_props[:]
    assert before.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    onnx.checker.check_model(model)


def test_recorded_recipe_drops_location_keys():
    recipe = {"model": {"name": "m"}, "out_dir": "/a", "cache_dir": "/b", "name": None}
    assert recorded_recipe(recipe) == {"model": {"name": "m"}, "name": None}


def test_json_diff_paths():
    assert json_diff({"a": [1, {"b": 2}], "c": 1}, {"a": [1, {"b": 3}], "c": 1}) == ["a[1].b"]
    assert json_diff({"a": [1]}, {"a": [1, 2]}) == ["a"]
    assert json_diff({"x": 1}, {"y": 1}) == ["x", "y"]


def test_repro_main_compare_exit_codes(twins, capsys):
    a, b = twins
    assert main(["--compare", str(a), str(b)]) == 0
    assert "reproducible: yes" in capsys.readouterr().out
    (b / "generation_config.json").write_text("{}\n")
    assert main(["--compare", str(a), str(b)]) == 1
    assert "generation_config.json | differs" in capsys.readouterr().out
    assert main(["--compare", str(a), str(a.parent / "missing")]) == 2


def test_compare_dirs_refuses_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="is not a folder"):
        compare_dirs(tmp_path, tmp_path / "nope")
