"""Recipe schema: YAML (Hydra) -> schema-checked frozen dataclasses, converted once in the CLI.

A typo in a key is an error naming the key and the valid ones. Nothing below the CLI sees OmegaConf.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from vlmforge.errors import RecipeError

PRECISIONS = ("fp32", "fp16", "int4")


@dataclass
class ModelConfig:
    name: str = "???"
    family: str = "???"
    checkpoint: str = "???"  # local folder, hub id, or fixture:<family>
    revision: Optional[str] = None
    trust_remote_code: bool = False
    load_dtype: str = "float32"
    deepstack: str = "keep"  # keep | drop (families with DeepStack)


@dataclass
class Int4Config:
    algorithm: str = "default"  # default (RTN-style) | hqq
    block_size: int = 128
    symmetric: bool = True
    accuracy_level: int = 4
    quantize_lm_head: bool = False
    quantize_embedding: bool = False


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    vision: str = "fp32"
    embedding: str = "fp32"
    decoder: str = "fp32"
    fp16_io: bool = False  # FP16 graphs: keep FP32 graph I/O unless this is set
    int4: Int4Config = field(default_factory=Int4Config)


@dataclass
class VisionConfig:
    size: str = "small"  # small | large | an explicit side in pixels


@dataclass
class TargetConfig:
    name: str = "cpu"
    providers: list = field(default_factory=lambda: ["CPUExecutionProvider"])
    export_device: str = "cpu"
    precisions: list = field(default_factory=lambda: ["fp32", "fp16", "int4"])  # what this target can run
    allow_fallback: bool = False  # build even if a listed provider is missing (runs on the next one)


@dataclass
class ValidateConfig:
    enabled: bool = True
    chain_tokens: int = 32
    decode_steps: int = 3
    prompt: str = "Describe this image in detail."
    text_prompt: str = "Write a short poem about the sea."
    image_seeds: list = field(default_factory=lambda: [1, 2])
    images: list = field(default_factory=list)  # optional user image paths used instead of built-in ones
    task_questions: int = 0  # > 0 on trained fixtures: held-out task accuracy, ONNX vs PyTorch FP32
    tolerances: dict = field(default_factory=dict)


@dataclass
class BuildConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    out_dir: str = "artifacts"
    cache_dir: str = ".work"
    name: Optional[str] = None  # artifact dir name under out_dir/<model.name>/; default <precision>-<size>


def register_schema() -> None:
    """Make the dataclass schema the base of recipes/build.yaml (its defaults list names `build_schema`),
    so every schema key can be overridden on the command line and unknown keys fail at composition."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="build_schema", node=BuildConfig)


def valid_keys(parent: str) -> list[str]:
    node = BuildConfig()
    for part in filter(None, parent.split(".")):
        node = getattr(node, part, None)
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []


def unknown_key_error(key: str, recipe: str) -> RecipeError:
    parent = key.lstrip("+~").rsplit(".", 1)[0] if "." in key else ""
    keys = valid_keys(parent)
    return RecipeError(f"recipe key {key!r} does not exist", where=recipe,
                       fix=f"valid keys{' under ' + parent if parent else ''}: {keys}")


def _schema_error(exc: Exception, recipe: str) -> RecipeError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    parent = key.rsplit(".", 1)[0] if "." in str(key) else ""
    valid = valid_keys(parent)
    msg = str(exc).splitlines()[0]
    return RecipeError(
        f"recipe key {key!r} is not valid: {msg}",
        where=recipe,
        fix=f"valid keys{' under ' + parent if parent else ''}: {valid}" if valid else "check the key's type",
    )


def from_omegaconf(cfg: Any, recipe: str = "recipes/build.yaml") -> BuildConfig:
    """Merge the composed recipe onto the schema (unknown keys and wrong types fail) -> BuildConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        schema = OmegaConf.structured(BuildConfig)
        # Plain container first: Hydra's `+key=value` lifts struct mode, and a typed node would then carry an
        # unknown key through the merge silently.
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else cfg
        merged = OmegaConf.merge(schema, plain)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise RecipeError(
                f"recipe leaves {missing} unset",
                where=recipe,
                fix="choose a model recipe (model=<name>) or set the keys on the command line",
            )
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _schema_error(exc, recipe) from exc
    check(obj, recipe)
    return obj


def check(cfg: BuildConfig, recipe: str) -> None:
    """Cross-field checks that need no model: precision names, deepstack choice, chain length."""
    for stage in ("vision", "embedding", "decoder"):
        p = getattr(cfg.precision, stage)
        if p not in PRECISIONS:
            raise RecipeError(f"precision.{stage}={p!r} is not a precision", where=recipe, fix=f"use one of {list(PRECISIONS)}")
    if cfg.model.deepstack not in ("keep", "drop"):
        raise RecipeError(f"model.deepstack={cfg.model.deepstack!r}", where=recipe, fix="use keep or drop")
    if cfg.validate.chain_tokens < 1:
        raise RecipeError("validate.chain_tokens must be >= 1", where=recipe, fix="set validate.chain_tokens=32")


def resolve_image_size(size: str, family, where: str) -> int:
    """small/large pick the family's standard sizes; digits are checked against the family's patch grid."""
    s = str(size).strip().lower()
    if s == "small":
        return family.default_sizes[0]
    if s == "large":
        return family.default_sizes[-1]
    if not s.isdigit():
        raise RecipeError(
            f"vision.size={size!r} is neither small, large nor a number of pixels",
            where=where,
            fix=f"use vision=small, vision=large or e.g. vision.size={family.default_sizes[0]}",
        )
    value = int(s)
    family.check_image_size(value, where)
    return value


def to_dict(cfg: BuildConfig) -> dict:
    return dataclasses.asdict(cfg)
