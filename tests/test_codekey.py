"""Cache keys follow the code a node runs (vlmforge.codekey): an edit re-keys exactly the nodes whose
import closure holds the edited file. Each test copies the package source, edits one file of the copy and
compares every node's code digest computed from the original and from the edited tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vlmforge import codekey as K
from vlmforge.core.modgraph import read_graph
from vlmforge.registry import STAGES, families, family_module
from vlmforge.transforms import TRANSFORMS


def _codes(root: Path) -> dict[tuple, str]:
    graph = read_graph(root, "vlmforge")
    out = {}
    for key, fam in families().items():
        for stage in STAGES:
            out[("export", key, stage)] = K.export_code(fam, family_module(key), stage, graph)
        out[("validation", key)] = K.validation_code(fam, family_module(key), graph)
    for precision in TRANSFORMS:
        out[("transform", precision)] = K.transform_code(precision, graph)
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "vlmforge"
    shutil.copytree(K.PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    return root, _codes(root)


def _changed_after_editing(original, tmp_path, rel: str) -> set[tuple]:
    root, before = original
    edited = tmp_path / "vlmforge"
    shutil.copytree(root, edited)
    with open(edited / rel, "a") as f:
        f.write("\n# an edit\n")
    after = _codes(edited)
    assert before.keys() == after.keys()
    return {node for node in before if before[node] != after[node]}


def test_the_copy_computes_the_live_codes(original):
    """The copied tree gives the same digests as the installed package (the tests below compare like with like)."""
    _root, before = original
    assert before == _codes(K.PACKAGE)


def test_editing_qwen3_vl_vision_leaves_every_qwen2_5_vl_node_cached(original, tmp_path):
    changed = _changed_after_editing(original, tmp_path, "families/qwen3_vl/vision.py")
    assert ("export", "qwen3_vl", "vision") in changed and ("validation", "qwen3_vl") in changed
    assert not [n for n in changed if "qwen2_5_vl" in n], changed
    assert not [n for n in changed if n[0] == "transform"]
    assert ("export", "qwen3_vl", "decoder") not in changed  # the decoder does not run the vision code


def test_editing_cast_fp16_leaves_fp32_exports_and_int4_transforms_cached(original, tmp_path):
    changed = _changed_after_editing(original, tmp_path, "transforms/cast_fp16.py")
    assert changed == {("transform", "fp16")}


def test_editing_the_shared_decoder_exporter_re_keys_both_families_decoders_only(original, tmp_path):
    changed = _changed_after_editing(original, tmp_path, "exporters/decoder.py")
    assert {("export", "qwen2_5_vl", "decoder"), ("export", "qwen3_vl", "decoder")} <= changed
    assert ("export", "qwen2_5_vl", "vision") not in changed and ("transform", "int4") not in changed


@pytest.mark.parametrize("rel", ["build/execute.py", "build/plan.py", "build/nodes.py", "build/cache.py"])
def test_editing_the_build_executor_re_keys_everything(original, tmp_path, rel):
    changed = _changed_after_editing(original, tmp_path, rel)
    assert changed == set(original[1])


@pytest.mark.parametrize("rel", ["build/publish_dir.py", "transforms/__init__.py"])
def test_editing_publishing_or_the_transform_table_re_keys_nothing(original, tmp_path, rel):
    """Where a set is published, and which transforms exist, change no node's code (a transform's own row
    is one of its node's declared inputs instead)."""
    assert _changed_after_editing(original, tmp_path, rel) == set()


def test_exports_do_not_hold_validation_or_runtime_code():
    for key, fam in families().items():
        for stage in STAGES:
            spec = fam.stage(stage)
            mods = K.node_modules([spec.export.__module__, spec.contract.__module__, K.LOADER], [family_module(key)])
            assert not [m for m in mods if m.startswith(("vlmforge.validators", "vlmforge.runtime"))], (key, stage)


def test_every_transform_precision_names_a_module_of_the_package():
    from vlmforge.config import PRECISIONS

    graph = K.package_graph()
    assert set(TRANSFORMS) == set(PRECISIONS) - {"fp32"}
    assert all(row.module in graph.files for row in TRANSFORMS.values())
    # a transform's code is its own module's closure: the cast does not hold the quantizer, nor either the build
    fp16 = K.node_modules([TRANSFORMS["fp16"].module])
    assert TRANSFORMS["int4"].module not in fp16 and "vlmforge.build.run" not in fp16
