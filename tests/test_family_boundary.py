"""A family is one folder: outside `vlmforge/families/` no code names a family key or a family's HF class.

What is scanned: every identifier, attribute, imported name and string constant of every module under
src/vlmforge, outside families/. Docstrings and comments are not code and may use a family in an example
(`vlmforge generate artifacts/tiny-qwen2_5_vl/...`). A name counts if it contains a family key (so recipe
names such as `tiny_<key>` and fixture names count too) or a class of the `Qwen...` HF namespace.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from vlmforge.registry import families

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmforge"
# (file, name) pairs allowed, each with its reason.
ALLOWED = {
    # The fixture tokenizer every family's fixture (and the trained fixtures, and the benchmark checkpoint)
    # shares: a tiny BPE that borrows the Qwen2 pre-tokeniser pipeline. Not a fact of one family; a family
    # with another tokenizer would bring its own fixture tokenizer in its folder.
    ("fixtures/tokenizer.py", "Qwen2TokenizerFast"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _names(tree: ast.AST):
    """(line, text) of every name and non-docstring string constant in `tree`."""
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.alias):
            yield node.lineno, node.name
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def family_words() -> re.Pattern:
    keys = sorted(families())
    hf = {c for f in families().values() for c in (f.hf_class, f.image.processor_class, *f.architectures)}
    return re.compile("|".join([*map(re.escape, keys), *map(re.escape, sorted(hf)), r"\bQwen\w*(?:Config|Model|Processor|ForConditionalGeneration|Tokenizer)\w*"]))


def offenders(root: Path = SRC) -> list[str]:
    pattern, out = family_words(), []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("families/"):
            continue
        for line, text in _names(ast.parse(path.read_text(), filename=str(path))):
            if pattern.search(text) and (rel, text) not in ALLOWED:
                out.append(f"{rel}:{line}: {text[:80]!r}")
    return sorted(set(out))


def test_no_code_outside_families_names_a_family():
    assert offenders() == []


def test_the_scan_finds_a_family_name(tmp_path):
    """The scan itself works: a planted key, HF class and recipe name are all found."""
    (tmp_path / "x.py").write_text('"""docstrings may say qwen2_5_vl."""\nA = {"qwen3_vl": 1}\n'
                                   'from transformers import Qwen2_5_VLForConditionalGeneration\nB = "model=tiny_qwen2_5_vl"\n')
    found = offenders(tmp_path)
    assert [f.split(":")[1] for f in found] == ["2", "3", "4"], found
