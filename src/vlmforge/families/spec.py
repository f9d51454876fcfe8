"""What a model family is: one FamilySpec per family folder, holding every fact about the family.

A family module (`vlmforge/families/<key>/__init__.py`) builds its FamilySpec from direct function
references, so a misspelt hook fails when the module is imported (which `vlmforge.registry` does for every
family at its own import), not when a build first calls it. Families import this module, never the
registry: the registry is the one place that knows which families exist.

Everything outside `families/` asks the spec (through the registry) instead of keeping its own table keyed
by family name: the genai model type, image-preprocessing defaults, the HF classes,
the trained fixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from vlmforge.core.errors import RecipeError

STAGES = ("vision", "embedding", "decoder")


@dataclass(frozen=True)
class StageSpec:
    """How one stage of one family is described and exported.

    contract(hf_config, options) -> StageContract       (pure: no model, no files)
    export(hf_model, options, out_path) -> StageContract
    `options` is a build.StageOptions holding only the fields the stage's cache key records.
    """

    name: str
    contract: Callable[[Any, Any], Any]
    export: Callable[[Any, Any, Any], Any]


@dataclass(frozen=True)
class ImageDefaults:
    """Image preprocessing facts of the family: the HF image-processor class the PyTorch reference runs,
    and the mean/std used when a checkpoint's preprocessor_config.json does not give them."""

    processor_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class TrainedSpec:
    """The family's trained tiny fixture (`vlmforge.fixtures.trained`): the one square side it was trained
    on, and the family's functions giving its config and its preprocessor config."""

    image_size: int
    config_dict: Callable[[], dict]
    image_processor_config: Callable[[], dict]


@dataclass(frozen=True)
class FamilySpec:
    key: str  # HF config.model_type
    display_name: str
    hf_class: str  # transformers class name of the full model (its .config_class reads config.json)
    architectures: tuple[str, ...]  # config.json "architectures" values this family accepts
    patch_multiple: int  # valid fixed image sides are multiples of this (patch size x spatial merge)
    default_sizes: tuple[int, ...]  # vision=small, vision=large
    check_image_size: Callable[[int, str], None]
    check_checkpoint_config: Callable[[Any, str], None]  # (hf_config, where): loud on configs HF accepts silently
    deepstack_layers: Callable[[Any], int]  # hf_config -> number of DeepStack layers (0 = none)
    write_fixture: Callable[[Any], Any]  # out_dir -> the tiny random checkpoint folder
    fixture_name: str
    # (hf_model, pixel_values, grid_thw) -> features, or (features, deepstack features): HF's own vision tower
    reference_vision: Callable[[Any, Any, Any], Any]
    image: ImageDefaults
    # onnxruntime-genai model type (genai_config.json "type"); None: onnxruntime-genai cannot run the family
    genai_type: str | None = None
    trained: TrainedSpec | None = None
    # (out_dir, layers, vision_depth) -> a random checkpoint at the family's public small-model widths, for
    # `vlmforge.bench` (None: the benchmark runs the tiny fixture only)
    write_bench_checkpoint: Callable[[Any, int, int], Any] | None = None
    # hf_model -> context manager running the HF model without DeepStack (families that have it)
    deepstack_off: Callable[[Any], Any] | None = None
    stages: dict[str, StageSpec] = field(default_factory=dict)
    # the vision stage of a `vision=dynamic` build (any grid, several images per call); None: fixed sizes only
    dynamic_vision: StageSpec | None = None
    # stage -> the prefixes of the HF model's parameter names the stage's export reads (vlmforge.loading
    # materialises only those); a stage not listed reads the whole model
    stage_weights: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # transformers' parameter name -> the name the family's hub checkpoints store it under, when they predate
    # transformers' layout (None: the same names)
    checkpoint_name: Callable[[str], str] | None = None

    def stage(self, name: str, dynamic: bool = False) -> StageSpec:
        """The StageSpec of stage `name`; `dynamic`: the dynamic-resolution one for the vision stage."""
        if dynamic and name == "vision":
            if self.dynamic_vision is None:
                raise RecipeError(f"family {self.key} has no dynamic-resolution vision stage",
                                  where=f"registry of family {self.key}", fix="use a fixed vision size")
            return self.dynamic_vision
        if name not in self.stages:
            raise RecipeError(
                f"family {self.key} has no stage {name!r}",
                where=f"registry of family {self.key}",
                fix=f"use one of {sorted(self.stages)}",
            )
        return self.stages[name]
