"""Which source a cache node runs, and its digest: the `code` part of every stage-cache key.

A node's code is the transitive closure, over the import graph read from the source (`core.modgraph`,
imports inside functions included), of the modules the node calls into, plus the executor that drives
every node (`EXECUTOR`: the plan, the executor, the node bodies and the cache, hashed as files: what they
import for one node is in that node's roots). So:

* an FP32 export of (family, stage) runs that stage's hook modules and the checkpoint loader;
* a transform runs the module its row of `transforms.TRANSFORMS` names (its FP32 input's key, code
  included, is part of its key);
* the runtime configs run the config writers and the image parameters;
* a validation runs the validators, the runtime they drive, the validation images and the family's
  reference hooks.

Editing `families/qwen3_vl/vision.py` changes no Qwen2.5-VL key; editing `transforms/cast_fp16.py` changes
only FP16 transforms. Looked up through, never followed nor hashed: the registry and the family table
(`LOOKUP`) — they import every family, and which family a key names is already in the node's roots — and
the transform table (a transform's row is in its node's declared inputs, its module in its roots). A
family's spec module (its `__init__`, the wiring of its hooks) is hashed as a file, not followed, so one
stage's key does not hold the family's other stages. Fixture writers are not code of a node either: what
they write reaches it as checkpoint files, which the key hashes by content. Hooks defined outside the package (a family folder
elsewhere on sys.path) are hashed by their module's file.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from pathlib import Path

from vlmforge.core.modgraph import ModuleGraph, read_graph

PACKAGE = Path(__file__).resolve().parent
EXECUTOR = ("vlmforge", "vlmforge.config", "vlmforge.build", "vlmforge.build.plan", "vlmforge.build.execute",
            "vlmforge.build.nodes", "vlmforge.build.cache")
# Not followed, not hashed: the registry and the family table (they import every family), the transform
# table (it names every transform), and the trained fixture writer `source` calls (its output reaches a node
# only as checkpoint files, hashed by content).
LOOKUP = frozenset({"vlmforge.registry", "vlmforge.families", "vlmforge.transforms", "vlmforge.fixtures.trained"})
LOADER = "vlmforge.source"  # reads, checks and loads the checkpoint every export starts from
STAGE_LOADER = "vlmforge.loading"  # materialises only the weights of the stage being exported
VALIDATION_ROOTS = ("vlmforge.validators.suite", "vlmforge.fixtures.images", "vlmforge.host.preprocess")
RUNTIME_ROOTS = ("vlmforge.artifact.runtime_configs", "vlmforge.host.image")


@functools.lru_cache(maxsize=None)
def package_graph() -> ModuleGraph:
    return read_graph(PACKAGE, "vlmforge")


def module_of(fn) -> str:
    return fn.__module__


def node_modules(follow, files_only=(), graph: ModuleGraph | None = None) -> list[str]:
    """The package modules a node runs: closure of `follow`, plus `files_only` and the executor unfollowed."""
    graph = graph or package_graph()
    shallow = set(files_only) | set(EXECUTOR)
    mods = set(graph.closure(follow, stop=LOOKUP | shallow)) | {m for m in shallow if m in graph.files}
    return sorted(mods - LOOKUP)


def node_code(follow, files_only=(), graph: ModuleGraph | None = None) -> str:
    """sha256 over the package modules a node runs and the files of its roots outside the package."""
    graph = graph or package_graph()
    h = hashlib.sha256(graph.digest(node_modules(follow, files_only, graph)).encode())
    for m in sorted(set(follow) | set(files_only)):
        if m not in graph.files and m in sys.modules and not m.startswith("vlmforge"):
            h.update(m.encode() + b"\0" + Path(inspect.getsourcefile(sys.modules[m])).read_bytes())
    return h.hexdigest()


def export_code(family, family_module: str, stage: str, graph: ModuleGraph | None = None,
                dynamic: bool = False) -> str:
    spec = family.stage(stage, dynamic=dynamic)
    return node_code([module_of(spec.export), module_of(spec.contract), LOADER, STAGE_LOADER], [family_module], graph)


def transform_code(precision: str, graph: ModuleGraph | None = None) -> str:
    from vlmforge.transforms import TRANSFORMS

    return node_code([TRANSFORMS[precision].module], (), graph)


def runtime_configs_code(family_module: str, graph: ModuleGraph | None = None) -> str:
    return node_code(RUNTIME_ROOTS, [family_module], graph)


def validation_code(family, family_module: str, graph: ModuleGraph | None = None) -> str:
    hooks = [module_of(family.reference_vision)] + ([module_of(family.deepstack_off)] if family.deepstack_off else [])
    return node_code([*VALIDATION_ROOTS, *hooks], [family_module], graph)
