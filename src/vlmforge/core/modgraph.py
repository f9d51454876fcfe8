"""The import graph of a package, read from its source with `ast` (nothing is imported or executed).

Two uses: the no-cycle test (module-level imports only: those run when a module is imported, so a cycle
among them is a real import-order hazard) and the stage cache (`vlmforge.build.cache`), whose code key for a
node is the digest of the source of every module the node can run: the transitive closure over *all*
imports, those inside functions included, because a lazily imported module runs all the same.

Only imports that name a module of the package itself are edges. `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg`. Implicit parent-package imports (Python runs
`pkg/__init__.py` before `pkg.mod`) are not edges: they are counted where written, so a package whose
`__init__` is a plain table does not tie all its submodules together.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModuleGraph:
    root: Path  # the package folder (holding __init__.py)
    package: str  # its import name
    files: dict[str, Path] = field(default_factory=dict)  # module -> file
    module_level: dict[str, frozenset[str]] = field(default_factory=dict)  # imports run at import time
    all_imports: dict[str, frozenset[str]] = field(default_factory=dict)  # ... plus those inside functions

    def closure(self, roots, stop: frozenset[str] = frozenset()) -> list[str]:
        """Every module reachable from `roots` over all imports, sorted; modules in `stop` are included but
        not followed (a registry that imports every family must not pull every family into a stage)."""
        seen, todo = set(), [r for r in roots]
        while todo:
            m = todo.pop()
            if m in seen or m not in self.files:
                continue
            seen.add(m)
            if m not in stop:
                todo += sorted(self.all_imports.get(m, ()))
        return sorted(seen)

    def digest(self, modules) -> str:
        """sha256 over (module name, source bytes) of `modules`, in name order."""
        h = hashlib.sha256()
        for m in sorted(modules):
            h.update(m.encode() + b"\0" + self.files[m].read_bytes() + b"\0")
        return h.hexdigest()

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups (more than one module, or a self-import) of the module-level graph."""
        index, low, stack, on, out = {}, {}, [], set(), []

        def visit(v: str) -> None:  # Tarjan; the graph is small (~100 modules), recursion is fine
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in sorted(self.module_level.get(v, ())):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1 or v in self.module_level.get(v, ()):
                    out.append(sorted(group))

        for v in sorted(self.files):
            if v not in index:
                visit(v)
        return out


def module_name(root: Path, package: str, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, current: str, is_package: bool, known: set[str]) -> set[str]:
    out = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in known:  # `import pkg.a.b` binds pkg and runs pkg.a.b
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(node, current, is_package)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in known:
                out.add(sub)
            elif base in known:
                out.add(base)
    return out


def _module_level_nodes(tree: ast.Module):
    """Statements run at import time: the module body, descending into if/try/with but not into def/class
    bodies' functions (`if TYPE_CHECKING:` blocks are skipped: they never run)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        yield node
        todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]


def read_graph(root: Path, package: str) -> ModuleGraph:
    """The graph of every .py under `root` (the folder of package `package`)."""
    root = Path(root)
    files = {module_name(root, package, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    module_level, all_imports = {}, {}
    for name, path in files.items():
        tree = ast.parse(path.read_bytes(), filename=str(path))
        is_package = path.name == "__init__.py"
        every = {t for n in ast.walk(tree) for t in _targets(n, name, is_package, known)}
        top = {t for n in _module_level_nodes(tree) for t in _targets(n, name, is_package, known)}
        all_imports[name] = frozenset(every - {name})
        module_level[name] = frozenset(top - {name})
    return ModuleGraph(root, package, files, module_level, all_imports)
