"""The recipe schema as plain dataclasses, and the checks that need no model.

Composition (Hydra/OmegaConf) lives in `vlmforge.recipe`, which merges a composed recipe onto these
dataclasses; everything else takes a `BuildConfig`. A typo in a key is an error naming the key and the
valid ones (`valid_keys`, `unknown_key_error`, shared with `vlmforge.recipe.schema`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

from vlmforge.core.errors import RecipeError
from vlmforge.host.sizes import normalise
from vlmforge.transforms import TRANSFORMS

MISSING = "???"  # a key the recipe must set (OmegaConf's mark for a mandatory value)
PRECISIONS = ("fp32", *TRANSFORMS)  # FP32 is the export itself; every other precision is a transform


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
    size: str = "small"  # small | large | a side in pixels | HEIGHTxWIDTH (672x1008) | dynamic (any size within a pixel budget)
    # vision=dynamic only: the smart_resize pixel budget; None = the checkpoint's preprocessor_config.json
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None


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
    # the PyTorch reference: resident (the whole model in memory), streamed (decoder layers and ViT blocks read
    # from the checkpoint around their forward: same outputs, ~1/4 of the memory), auto (streamed from 4 GiB of
    # FP32 weights)
    reference: str = "auto"
    # trained (real checkpoints, trained fixtures) | random (random-weight checkpoints, `vlmforge fixture`): the
    # quality gates of a transformed graph use its `<precision>_random` tolerance where the recipe has one (a
    # sanity bound: random weights cannot judge quantization quality); the graph checks are the same either way
    weights: str = "trained"
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


def from_dict(data: dict, recipe: str) -> BuildConfig:
    """A recipe recorded as plain data (a manifest's `recipe`) -> BuildConfig, with the checks composition
    makes: unknown keys, values of the wrong type and unset keys fail, then `check`. No OmegaConf."""
    obj = _from_dict(BuildConfig, data, "", recipe)
    missing = sorted(_missing_keys(obj))
    if missing:
        raise RecipeError(f"recipe leaves {missing} unset", where=recipe,
                          fix="choose a model recipe (model=<name>) or set the keys on the command line")
    check(obj, recipe)
    return obj


def _from_dict(cls, data, prefix: str, recipe: str):
    if not isinstance(data, dict):
        raise RecipeError(f"recipe key {prefix.rstrip('.') or '<root>'!r} is not a mapping", where=recipe,
                          fix=f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
                              f"{valid_keys(prefix.rstrip('.'))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise unknown_key_error(full, recipe)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _from_dict(hint, value, f"{full}.", recipe)
            continue
        allowed = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        if not any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed):
            raise RecipeError(f"recipe key {full!r}: {value!r} is not a {' or '.join(t.__name__ for t in allowed)}",
                              where=recipe, fix=f"give {full} a value of its type (see vlmforge.config.BuildConfig)")
        values[key] = copy.deepcopy(value)
    return cls(**values)


def _missing_keys(node, prefix: str = ""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _missing_keys(value, f"{prefix}{f.name}.")
        elif value == MISSING:
            yield f"{prefix}{f.name}"


# Which dtypes a checkpoint may be loaded in for export. bfloat16/float16 loading would export graphs whose
# weights and outputs are not FP32 under an FP32 label; until the exporters cast per stage, FP32 only.
LOAD_DTYPES = ("float32",)
# validate.tolerances.<stage>.<precision>.<metric>: the stages and metrics the validators gate on.
TOLERANCE_STAGES = ("preprocess", "vision", "embedding", "decoder", "chain", "task")
TOLERANCE_METRICS = ("max_abs", "max_rel", "mean_abs", "accuracy_drop", "cosine", "mean_cosine", "top1", "top5",
                     "token_match", "answer_agreement", "near_tie", "near_tie_rel", "max_step_error")


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
    check_vision(cfg.vision, recipe)


DYNAMIC = "dynamic"  # vision.size of a dynamic-resolution build
PIXEL_KEYS = ("min_pixels", "max_pixels")


def check_vision(vision: VisionConfig, recipe: str) -> None:
    """min/max pixels: positive integers, min <= max, and only for vision=dynamic (a fixed size has no
    pixel budget). Bounds left null are the checkpoint's; the build checks them once it has read it."""
    dynamic = str(vision.size).strip().lower() == DYNAMIC
    for key in PIXEL_KEYS:
        value = getattr(vision, key)
        if value is None:
            continue
        if not dynamic:
            raise RecipeError(f"vision.{key}={value!r} is set but vision.size={vision.size!r} is a fixed size",
                              where=f"{recipe}: vision.{key}",
                              fix=f"use vision=dynamic for a pixel budget, or drop vision.{key}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RecipeError(f"vision.{key}={value!r} must be a positive integer (pixels)", where=f"{recipe}: vision.{key}",
                              fix=f"set vision.{key} to a number of pixels, e.g. {256 * 28 * 28}, or null for the "
                                  "checkpoint's preprocessor_config.json")
    if vision.min_pixels is not None and vision.max_pixels is not None and vision.min_pixels > vision.max_pixels:
        raise RecipeError(f"vision.min_pixels={vision.min_pixels} is larger than vision.max_pixels={vision.max_pixels}",
                          where=f"{recipe}: vision", fix="set min_pixels <= max_pixels")


# int4_weights: an INT4 graph against PyTorch running the same dequantized weights (validators/same_weights.py)
TOLERANCE_KEYS = (*PRECISIONS, "int4_weights", "int4_random")


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


def resolve_image_size(size: str, family, where: str):
    """small/large pick the family's standard sizes; digits (a square side) and HEIGHTxWIDTH (e.g. 672x1008)
    are checked against the family's patch grid, each side on its own; dynamic is None (any size: the family's
    dynamic-resolution vision stage). A square is an int (HxW with equal sides too), HxW a (height, width)."""
    s = str(size).strip().lower()
    if s == DYNAMIC:
        if family.dynamic_vision is None:
            raise RecipeError(f"vision=dynamic: {family.display_name} has no dynamic-resolution vision stage",
                              where=where, fix=f"use vision=small, vision=large or e.g. vision.size={family.default_sizes[0]}")
        return None
    if s == "small":
        return family.default_sizes[0]
    if s == "large":
        return family.default_sizes[-1]
    example = family.default_sizes[-1]
    if "x" in s:
        parts = s.split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise RecipeError(f"vision.size={size!r} is not HEIGHTxWIDTH in pixels", where=where,
                              fix=f"write two whole numbers joined by x (height first), e.g. vision.size={example}x"
                                  f"{example * 3 // 2 // family.patch_multiple * family.patch_multiple}")
        hw = tuple(int(p) for p in parts)
        family.check_image_size(hw, where)
        return normalise(hw)
    if not s.isdigit():
        raise RecipeError(
            f"vision.size={size!r} is neither small, large nor a number of pixels",
            where=where,
            fix=f"use vision=small, vision=large, vision=dynamic, e.g. vision.size={family.default_sizes[0]} "
                f"or HEIGHTxWIDTH",
        )
    value = int(s)
    family.check_image_size(value, where)
    return value


def to_dict(cfg: BuildConfig) -> dict:
    """The recipe as plain data. The pixel budget is a key of dynamic builds only: a fixed-size recipe is
    recorded without it (as before the key existed), so its manifest is unchanged."""
    data = dataclasses.asdict(cfg)
    if str(cfg.vision.size).strip().lower() != DYNAMIC:
        for key in PIXEL_KEYS:
            if data["vision"][key] is None:
                del data["vision"][key]
    return data
