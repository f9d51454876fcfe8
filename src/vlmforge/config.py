"""Recipe schema: YAML (Hydra) -> schema-checked frozen dataclasses, converted once in the CLI.

A typo in a key is an error naming the key and the valid ones. Nothing below the CLI sees OmegaConf.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from vlmforge.core.errors import RecipeError

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
    memory_check: bool = True  # refuse a build the machine cannot hold (launch/plan.py); false: warn and go on


def register_schema() -> None:
    """Make the dataclass schema the base of recipes/build.yaml (its defaults list names `build_schema`),
    so every schema key can be overridden on the command line and unknown keys fail at composition."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="build_schema", node=BuildConfig)


def valid_keys(parent: str) -> list[str]:
    """The keys that may follow `parent.` in a recipe (the tolerance tree is free-form YAML with a fixed
    vocabulary: stages, then precisions, then metrics)."""
    parts = [p for p in parent.split(".") if p]
    if parts[:2] == ["validate", "tolerances"] and len(parts) <= 4:
        return list((TOLERANCE_STAGES, PRECISIONS, TOLERANCE_METRICS)[len(parts) - 2])
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


# Which dtypes a checkpoint may be loaded in for export. bfloat16/float16 loading would export graphs whose
# weights and outputs are not FP32 under an FP32 label; until the exporters cast per stage, FP32 only.
LOAD_DTYPES = ("float32",)
# validate.tolerances.<stage>.<precision>.<metric>: the stages and metrics the validators gate on.
TOLERANCE_STAGES = ("preprocess", "vision", "embedding", "decoder", "chain", "task")
TOLERANCE_METRICS = ("max_abs", "max_rel", "mean_abs", "accuracy_drop", "cosine", "mean_cosine", "top1", "top5",
                     "token_match", "answer_agreement", "near_tie", "max_step_error")


def check(cfg: BuildConfig, recipe: str) -> None:
    """Cross-field checks that need no model: precision names, deepstack choice, validation numbers."""
    for stage in ("vision", "embedding", "decoder"):
        p = getattr(cfg.precision, stage)
        if p not in PRECISIONS:
            raise RecipeError(f"precision.{stage}={p!r} is not a precision", where=recipe, fix=f"use one of {list(PRECISIONS)}")
    if cfg.model.deepstack not in ("keep", "drop"):
        raise RecipeError(f"model.deepstack={cfg.model.deepstack!r}", where=recipe, fix="use keep or drop")
    if cfg.model.load_dtype not in LOAD_DTYPES:
        raise RecipeError(f"model.load_dtype={cfg.model.load_dtype!r} is not supported", where=f"{recipe}: model.load_dtype",
                          fix=f"use one of {list(LOAD_DTYPES)}: the exported graphs and their FP32 validation assume "
                              "FP32 weights (lower precisions come from precision=fp16 / int4_mixed)")
    v = cfg.validate
    for key, value, low in (("chain_tokens", v.chain_tokens, 1), ("decode_steps", v.decode_steps, 1),
                            ("task_questions", v.task_questions, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RecipeError(f"validate.{key}={value!r} must be an integer >= {low}", where=f"{recipe}: validate.{key}",
                              fix=f"set validate.{key} to an integer >= {low} (recipes/validate/standard.yaml has the defaults)")
    if v.enabled and not v.images and not v.image_seeds:
        raise RecipeError("validate.image_seeds is empty and validate.images names no image", where=recipe,
                          fix="leave validate.image_seeds=[1,2] or list image files in validate.images")
    for i, img in enumerate(v.images):
        if not isinstance(img, str) or not os.path.isfile(os.path.expanduser(img)):
            raise RecipeError(f"validate.images[{i}]={img!r} is not an image file", where=f"{recipe}: validate.images",
                              fix="list paths of existing image files (PNG, JPEG, ...)")
    check_tolerances(v.tolerances, recipe)


# int4_weights: an INT4 graph against PyTorch running the same dequantized weights (validators/same_weights.py)
TOLERANCE_KEYS = (*PRECISIONS, "int4_weights")


def check_tolerances(tolerances, recipe: str) -> None:
    """validate.tolerances is free-form YAML: every stage, precision and metric must be one the validators
    know and every bound a finite number, or a typo would silently leave a check ungated."""
    where = f"{recipe}: validate.tolerances"
    if not isinstance(tolerances, dict):
        raise RecipeError("validate.tolerances is not a mapping", where=where, fix="see recipes/validate/standard.yaml")
    for stage, per_precision in tolerances.items():
        if stage not in TOLERANCE_STAGES:
            raise RecipeError(f"validate.tolerances.{stage} is not a validated stage", where=where,
                              fix=f"valid keys under validate.tolerances: {list(TOLERANCE_STAGES)}")
        for precision, bounds in (per_precision or {}).items():
            key = f"validate.tolerances.{stage}.{precision}"
            if precision not in TOLERANCE_KEYS:
                raise RecipeError(f"{key} is not a precision", where=where,
                                  fix=f"valid keys under validate.tolerances.{stage}: {list(TOLERANCE_KEYS)}")
            if not isinstance(bounds, dict) or not bounds:
                raise RecipeError(f"{key} must map metrics to bounds", where=where,
                                  fix=f"e.g. {key}.max_rel=5.0e-5; valid metrics: {list(TOLERANCE_METRICS)}")
            for metric, bound in bounds.items():
                if metric not in TOLERANCE_METRICS:
                    raise RecipeError(f"{key}.{metric} is not a metric", where=where,
                                      fix=f"valid keys under {key}: {list(TOLERANCE_METRICS)}")
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                    raise RecipeError(f"{key}.{metric}={bound!r} is not a number", where=where,
                                      fix=f"set {key}.{metric} to a finite number, e.g. 5.0e-5")


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
