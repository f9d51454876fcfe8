"""The fixed-size image preprocessing of an artifact set: one ImageParams, written to and read from the
manifest's `components.vision.preprocess`, used by the build, the validators and the runtime alike.

`image_params` reads the checkpoint's preprocessor_config.json; what it lacks comes from the vision config
(grid facts) and from the family's defaults (mean/std, FamilySpec.image), passed in by the caller: this
layer knows no family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmforge.host.dynamic import DynamicImageParams
from vlmforge.host.preprocess import image_to_patches
from vlmforge.host.sizes import FIT_STRETCH, FixedSize, is_square, size_hw, size_json


@dataclass(frozen=True)
class ImageParams:
    size: FixedSize  # a square side, or (height, width) (vlmforge.host.sizes)
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dynamic = False  # a fixed size (host.dynamic.DynamicImageParams: True)

    def patches(self, image) -> tuple[np.ndarray, np.ndarray]:
        return image_to_patches(
            image, size=self.size, patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size, mean=self.mean, std=self.std,
        )

    @property
    def hw(self) -> tuple[int, int]:
        return size_hw(self.size)

    @property
    def fit(self) -> str:
        """How an image of another size is fitted to the set's: stretched to height x width (the square sets
        too, where it is not recorded: their manifests are as before HxW existed)."""
        return FIT_STRETCH

    @property
    def tokens_per_image(self) -> int:
        h, w = self.hw
        return (h // self.patch_size // self.merge_size) * (w // self.patch_size // self.merge_size)

    @property
    def grid_thw(self) -> list[int]:
        h, w = self.hw
        return [1, h // self.patch_size, w // self.patch_size]

    def image_tokens(self, image) -> int:
        """`<|image_pad|>` tokens `image` becomes: the same for every image at a fixed size."""
        return self.tokens_per_image

    @property
    def hf_size(self) -> dict:
        """The `size` HF's image processor is given to land on this set's input: min = max = height*width
        pixels, so an image already of the set's height x width (square or not) is kept exactly as it is."""
        h, w = self.hw
        return {"shortest_edge": h * w, "longest_edge": h * w}

    def to_json(self) -> dict:
        out = {"size": size_json(self.size), "patch_size": self.patch_size,
               "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
               "mean": list(self.mean), "std": list(self.std)}
        if not is_square(self.size):
            out["fit"] = self.fit
        return out


def _preprocessor_config(source_path: Path) -> dict:
    cfg_path = Path(source_path) / "preprocessor_config.json"
    return json.loads(cfg_path.read_text()) if cfg_path.exists() else {}


def dynamic_image_params(source_path: Path, hf_config, min_pixels: int, max_pixels: int, default_mean,
                         default_std) -> DynamicImageParams:
    """The preprocessing of a vision=dynamic set: as `image_params`, with the pixel budget instead of a size
    (resolved by the build: the recipe's, or the checkpoint's)."""
    fixed = image_params(source_path, hf_config, 0, default_mean, default_std)
    return DynamicImageParams(fixed.patch_size, fixed.temporal_patch_size, fixed.merge_size, int(min_pixels),
                              int(max_pixels), fixed.mean, fixed.std)


def image_params(source_path: Path, hf_config, size: FixedSize, default_mean, default_std) -> ImageParams:
    """Read the checkpoint's preprocessor_config.json; the vision config fills the grid facts it lacks and the
    family's defaults (FamilySpec.image) the mean/std."""
    vc = hf_config.vision_config
    pp = _preprocessor_config(source_path)
    return ImageParams(
        size=size,
        patch_size=int(pp.get("patch_size", vc.patch_size)),
        temporal_patch_size=int(pp.get("temporal_patch_size", vc.temporal_patch_size)),
        merge_size=int(pp.get("merge_size", vc.spatial_merge_size)),
        mean=tuple(float(x) for x in pp.get("image_mean", default_mean)),
        std=tuple(float(x) for x in pp.get("image_std", default_std)),
    )
