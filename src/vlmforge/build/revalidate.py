"""`vlmforge validate DIR`: re-run every check of an existing artifact set against its source checkpoint."""

from __future__ import annotations

import dataclasses

from pathlib import Path

from vlmforge.build import source_config_sha256, validation_images
from vlmforge.config import from_dict
from vlmforge.core.contracts import StageContract
from vlmforge.core.errors import CheckpointError
from vlmforge.artifact.manifest import check_verified
from vlmforge.host.sizes import size_from_json
from vlmforge.loading import reference_kind, reference_model
from vlmforge.source import open_source
from vlmforge.host.dynamic import DynamicImageParams
from vlmforge.host.image import image_params
from vlmforge.validators.results import CheckResult
from vlmforge.validators.suite import SuiteInputs, run_suite


def contract_from_manifest(stage: str, comp: dict, meta: dict) -> StageContract:
    return StageContract.from_json(stage, comp, meta)


def revalidate(directory: Path, checkpoint: str | None = None) -> list[CheckResult]:
    """Every check of the build, re-run on the verified set against its source checkpoint (`checkpoint`
    overrides where the manifest says it was, for a checkpoint that moved)."""
    m = check_verified(Path(directory), "validate re-checks verified sets only")
    recipe = dict(m["recipe"])
    if checkpoint is not None:
        recipe["model"] = {**recipe.get("model", {}), "checkpoint": checkpoint}
    cfg = from_dict(recipe, recipe=f"{directory}/manifest.json recipe")
    where = "--checkpoint" if checkpoint is not None else \
        f"{directory}/manifest.json source.checkpoint (pass --checkpoint DIR if the checkpoint moved)"
    source = open_source(cfg.model.checkpoint, m["family"], cfg.model.revision, Path(cfg.cache_dir), where)
    if source.weight_files != m["source"]["weights"]:
        raise CheckpointError("the checkpoint's weights differ from the ones this artifact set was built from",
                              where=str(source.path), fix="pass --checkpoint with the original checkpoint, or rebuild")
    built_from = m["source"].get("config_sha256")
    if built_from and built_from != source_config_sha256(source.path):
        raise CheckpointError("the checkpoint's config.json differs from the one this artifact set was built from "
                              "(the artifacts themselves verify)", where=str(source.path / "config.json"),
                              fix="restore the original config.json, pass --checkpoint with the original checkpoint, "
                                  "or rebuild the set from this checkpoint")
    from vlmforge.build import StageOptions, load_hf_config
    from vlmforge.registry import get_family
    from vlmforge.source import check_model_size

    family = get_family(m["family"])
    hf_config = load_hf_config(source, cfg.model.trust_remote_code)
    parameters = check_model_size(source, hf_config)
    vision = m["components"]["vision"]
    dynamic = vision.get("vision") == "dynamic"
    size = None if dynamic else size_from_json(vision["image_size"])
    deepstack = family.deepstack_layers(hf_config) > 0 and cfg.model.deepstack == "keep"
    opts = StageOptions(size, deepstack)
    contracts = {s: family.stage(s, dynamic=dynamic).contract(hf_config, opts) for s in ("vision", "embedding", "decoder")}
    for s, c in contracts.items():
        if c.to_json() != {k: m["components"][s][k] for k in ("inputs", "outputs")}:
            raise CheckpointError(f"the {s} contract this checkpoint implies differs from the one in the manifest: "
                                  "the checkpoint is not the one the set was built from",
                                  where=f"{directory}/manifest.json components.{s}",
                                  fix="pass --checkpoint with the original checkpoint, or rebuild the set")
    precisions = {s: m["components"][s]["precision"] for s in contracts}
    dropped = cfg.model.deepstack == "drop" and family.deepstack_layers(hf_config) > 0
    if dynamic:  # the pixel budget the set was built with (its manifest), not today's checkpoint default
        params = DynamicImageParams.from_json(vision["preprocess"])
    else:
        params = image_params(source.path, hf_config, size, family.image.mean, family.image.std)
    inp = SuiteInputs(m["family"], Path(directory), contracts, precisions, params,
                      deepstack, tuple(cfg.target.providers), deepstack_off=family.deepstack_off if dropped else None)
    kind = reference_kind(cfg.validate.reference, parameters)
    inp = dataclasses.replace(inp, reference=kind)
    loader = lambda: reference_model(source, hf_config, cfg.model.load_dtype, kind)  # noqa: E731
    return run_suite(inp, loader, source.path, cfg.validate, validation_images(cfg.validate, dynamic, size)).checks
