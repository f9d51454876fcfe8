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

from vlmforge.host.preprocess import image_to_patches


@dataclass(frozen=True)
class ImageParams:
    size: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def patches(self, image) -> tuple[np.ndarray, np.ndarray]:
        return image_to_patches(
            image, size=self.size, patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size, mean=self.mean, std=self.std,
        )

    @property
    def tokens_per_image(self) -> int:
        return (self.size // self.patch_size // self.merge_size) ** 2

    def to_json(self) -> dict:
        return {"size": self.size, "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "mean": list(self.mean), "std": list(self.std)}


def image_params(source_path: Path, hf_config, size: int, default_mean, default_std) -> ImageParams:
    """Read the checkpoint's preprocessor_config.json; the vision config fills the grid facts it lacks and the
    family's defaults (FamilySpec.image) the mean/std."""
    vc = hf_config.vision_config
    cfg_path = Path(source_path) / "preprocessor_config.json"
    pp = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    return ImageParams(
        size=size,
        patch_size=int(pp.get("patch_size", vc.patch_size)),
        temporal_patch_size=int(pp.get("temporal_patch_size", vc.temporal_patch_size)),
        merge_size=int(pp.get("merge_size", vc.spatial_merge_size)),
        mean=tuple(float(x) for x in pp.get("image_mean", default_mean)),
        std=tuple(float(x) for x in pp.get("image_std", default_std)),
    )
