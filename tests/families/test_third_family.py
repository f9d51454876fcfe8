"""A family is one folder: a throw-away third family, defined in a temporary folder outside the package,
is built and validated end to end with nothing else changed but its row in the family table.

The family aliases Qwen2.5-VL's stage modules under its own key and architecture (its fixture is the
Qwen2.5-VL fixture with config.json naming the new architecture). The build runs in a subprocess on a
copy of the package source whose `families/__init__.py` has one more row, with the family folder on
PYTHONPATH: no other file of vlmforge is touched, no recipe is added (the model is chosen by overrides).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAMILY_FOLDER = '''
"""TinyAlias-VL: Qwen2.5-VL's stages under another key (a test family)."""
import dataclasses
import json
from pathlib import Path

from vlmforge.families import qwen2_5_vl as base

ARCHITECTURE = "TinyAliasVLForConditionalGeneration"


def write_fixture(out_dir):
    out = Path(base.fixture.write_fixture(out_dir))
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = [ARCHITECTURE]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


FAMILY = dataclasses.replace(base.FAMILY, key="tinyalias_vl", display_name="TinyAlias-VL",
                             architectures=(ARCHITECTURE,), fixture_name="tiny-tinyalias_vl",
                             write_fixture=write_fixture, trained=None, write_bench_checkpoint=None)
'''


@pytest.fixture(scope="module")
def third_family(tmp_path_factory):
    """(env, root): a package copy with one more table row, and the family folder on PYTHONPATH."""
    root = tmp_path_factory.mktemp("third")
    src = root / "src" / "vlmforge"
    shutil.copytree(REPO / "src" / "vlmforge", src, ignore=shutil.ignore_patterns("__pycache__"))
    table = src / "families" / "__init__.py"
    text = table.read_text()
    assert text.rstrip().endswith(")")
    table.write_text(text.rstrip()[:-1] + '    ("tinyalias_vl", "tinyalias_vl"),\n)\n')
    (root / "plugins" / "tinyalias_vl").mkdir(parents=True)
    (root / "plugins" / "tinyalias_vl" / "__init__.py").write_text(FAMILY_FOLDER)
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'plugins'}", "HF_HUB_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return env, root


def _vlmforge(env, *args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "vlmforge.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_third_family_from_a_temporary_folder_builds_end_to_end(third_family):
    env, root = third_family
    out, cache = root / "artifacts", root / "cache"
    run = _vlmforge(env, "export", "model=tiny_qwen2_5_vl", "model.family=tinyalias_vl",
                    "model.checkpoint=fixture:tinyalias_vl", "model.name=tiny-tinyalias_vl", "validate.chain_tokens=2",
                    f"out_dir={out}", f"cache_dir={cache}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    directory = out / "tiny-tinyalias_vl" / "fp32-392"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["family"] == "tinyalias_vl"
    assert {"vision.onnx", "embedding.onnx", "decoder.onnx", "genai_config.json"} <= {p.name for p in directory.iterdir()}
    assert [p.name for p in (cache / "stages").iterdir()] == ["tinyalias_vl"]  # its own cache slots
    verify = _vlmforge(env, "verify", str(directory))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_copy_differs_from_the_package_only_in_the_table_row(third_family):
    _env, root = third_family
    copy, live = root / "src" / "vlmforge", REPO / "src" / "vlmforge"
    differ = [p.relative_to(copy).as_posix() for p in sorted(copy.rglob("*")) if p.is_file()
              and "__pycache__" not in p.parts and p.read_bytes() != (live / p.relative_to(copy)).read_bytes()]
    assert differ == ["families/__init__.py"]
