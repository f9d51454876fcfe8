"""Built-in model families. Adding one = a folder with its stage files, a fixture, recipes and tests,
plus one import line here."""

from vlmforge.families import qwen2_5_vl, qwen3_vl  # noqa: F401  (each registers itself)
