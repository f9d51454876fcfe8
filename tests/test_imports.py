"""No import cycle in src/vlmforge, read from the code's imports (vlmforge.core.modgraph).

What counts: module-level imports between vlmforge modules (those that run when a module is imported,
inside `if`/`try`/class bodies included; `if TYPE_CHECKING:` blocks excluded), `from pkg import mod` as an
edge to the module. Imports inside functions are deliberate late binding and are checked separately: the
full graph must be acyclic too, so no layer reaches back up even lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

from vlmforge.core.modgraph import ModuleGraph, module_name, read_graph

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


# -- layers: Hydra/OmegaConf only in vlmforge.recipe, and vlmforge.cli is an entry point nothing imports ------------
COMPOSITION = ("hydra", "omegaconf")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[set[str]]:
    """For each import anywhere in the tree (in functions too; relative ones resolved), the absolute module
    names it may load; a literal string handed to importlib.import_module / __import__ counts as one."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [{a.name} for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(base[: len(base) - (node.level - 1)] + [node.module or ""]).strip(".") \
                if node.level else node.module
            out.append({base} | {f"{base}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            out.append({str(node.args[0].value)})
    return out


def _code_strings(tree: ast.AST) -> list[ast.AST]:
    """String constants that parse as Python with an import (`python -c` children): their imports count."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and "import " in n.value:
            try:
                out.append(ast.parse(n.value))
            except SyntaxError:  # prose (a docstring) that mentions an import
                pass
    return out


def layer_violations(root: Path, package: str) -> list[str]:
    """`module: what it imports`, one per import statement, for each import of Hydra/OmegaConf outside
    `<package>.recipe`, and of `<package>.cli` outside `<package>.cli` itself."""
    cli, recipe = f"{package}.cli", f"{package}.recipe"
    inside = lambda module, pkg: module == pkg or module.startswith(pkg + ".")  # noqa: E731
    out = []
    for path in sorted(Path(root).rglob("*.py")):
        module = module_name(Path(root), package, path)
        tree = ast.parse(path.read_bytes(), filename=str(path))
        statements = _imports(tree, module, path.name == "__init__.py")
        for code in _code_strings(tree):
            statements += _imports(code, module, False)
        for names in statements:
            bad = sorted(n for n in names if (n.split(".")[0] in COMPOSITION and not inside(module, recipe))
                         or (inside(n, cli) and not inside(module, cli)))
            if bad:
                out.append(f"{module}: {bad[0]}")
    return sorted(set(out))


def test_hydra_and_omegaconf_only_in_recipe_and_nothing_imports_the_cli():
    assert (SRC / "recipe" / "compose.py").is_file() and (SRC / "cli" / "__init__.py").is_file()
    assert layer_violations(SRC, "vlmforge") == []


def test_the_config_schema_imports_without_hydra_or_omegaconf():
    """The dataclasses and checks every stage reads stay importable where composition is not installed."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['hydra'] = sys.modules['omegaconf'] = None; "
            "from vlmforge.config import BuildConfig, check, from_dict, resolve_image_size, to_dict; "
            "import vlmforge.recipe, vlmforge.build.revalidate; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr


def test_planted_layer_violations_are_found(tmp_path):
    pkg = tmp_path / "pkg"
    for folder in (pkg, pkg / "recipe", pkg / "cli"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (pkg / "recipe" / "compose.py").write_text("from omegaconf import OmegaConf\nimport hydra\n")
    (pkg / "cli" / "run.py").write_text("from pkg.cli import x\nfrom pkg.recipe import compose\n")
    (pkg / "build.py").write_text("def f():\n    from omegaconf.errors import OmegaConfBaseException\n")
    (pkg / "bench.py").write_text("import importlib\nimportlib.import_module('hydra.core')\nfrom . import cli\n")
    (pkg / "repro.py").write_text("CHILD = 'import sys; from pkg.cli import main; main()'\nfrom pkg import cli\n")
    found = layer_violations(pkg, "pkg")
    assert found == ["pkg.bench: hydra.core", "pkg.bench: pkg.cli", "pkg.build: omegaconf.errors",
                     "pkg.repro: pkg.cli"], found
