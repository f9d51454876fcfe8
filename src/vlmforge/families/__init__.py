"""The model families: the one list of them.

Each row is (family key = HF `config.model_type`, the module whose `FAMILY` is its FamilySpec). Adding a
family = a folder with its stage files, a fixture, recipes and tests, plus one row here; nothing else.
`vlmforge.registry` imports every module listed and checks its spec; nothing else reads this table.
A table of names rather than imports: importing `vlmforge.families.spec` or `.grid` stays cheap, and the
registry alone decides when the families (and torch, which their stages need) are loaded.
"""

FAMILY_MODULES: tuple[tuple[str, str], ...] = (
    ("qwen2_5_vl", "vlmforge.families.qwen2_5_vl"),
    ("qwen3_vl", "vlmforge.families.qwen3_vl"),
)
