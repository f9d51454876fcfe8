"""No import cycle in src/vlmforge, read from the code's imports (vlmforge.core.modgraph).

What counts: module-level imports between vlmforge modules (those that run when a module is imported,
inside `if`/`try`/class bodies included; `if TYPE_CHECKING:` blocks excluded), `from pkg import mod` as an
edge to the module. Imports inside functions are deliberate late binding and are checked separately: the
full graph must be acyclic too, so no layer reaches back up even lazily.
"""

from __future__ import annotations

from pathlib import Path

from vlmforge.core.modgraph import ModuleGraph, read_graph

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmforge"


def test_no_module_level_import_cycle():
    graph = read_graph(SRC, "vlmforge")
    assert len(graph.files) > 50  # the graph really holds the package
    assert graph.cycles() == []


def test_no_cycle_even_through_imports_inside_functions():
    graph = read_graph(SRC, "vlmforge")
    full = ModuleGraph(graph.root, graph.package, graph.files, graph.all_imports, graph.all_imports)
    assert full.cycles() == []


def test_the_host_layer_imports_only_core_errors():
    graph = read_graph(SRC, "vlmforge")
    for module, imports in graph.all_imports.items():
        if module.startswith("vlmforge.host"):
            assert imports <= {"vlmforge.core.errors"} | {m for m in graph.files if m.startswith("vlmforge.host")}, module


def test_a_planted_cycle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("from . import a\ndef f():\n    from pkg import b\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n")
    (pkg / "e.py").write_text("from pkg import d\n")
    graph = read_graph(pkg, "pkg")
    assert graph.cycles() == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.b" in graph.all_imports["pkg.c"] and "pkg.b" not in graph.module_level["pkg.c"]


def test_the_core_layer_imports_only_itself():
    graph = read_graph(SRC, "vlmforge")
    for module, imports in graph.all_imports.items():
        if module.startswith("vlmforge.core"):
            assert imports <= {m for m in graph.files if m.startswith("vlmforge.core")}, module


def test_the_runtime_and_the_registry_import_without_torch():
    """Family stages import torch; the registry loads them only when asked for a family, so the runtime and
    `vlmforge verify` (which import `vlmforge.source`, hence the registry) stay torch-free."""
    import subprocess
    import sys

    code = ("import sys, vlmforge.registry, vlmforge.artifact.manifest, vlmforge.runtime.pipeline, vlmforge.source; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
