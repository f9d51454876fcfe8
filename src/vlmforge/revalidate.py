"""`vlmforge validate DIR`: re-run every check of an existing artifact set against its source checkpoint."""

from __future__ import annotations

from pathlib import Path

from vlmforge.build import validation_images
from vlmforge.config import from_omegaconf
from vlmforge.core.contracts import StageContract
from vlmforge.manifest import read_manifest, verify_dir
from vlmforge.errors import ArtifactError
from vlmforge.source import load_model, open_source
from vlmforge.host.image import image_params
from vlmforge.validators.results import CheckResult
from vlmforge.validators.suite import SuiteInputs, run_suite


def contract_from_manifest(stage: str, comp: dict, meta: dict) -> StageContract:
    return StageContract.from_json(stage, comp, meta)


def revalidate(directory: Path) -> list[CheckResult]:
    report = verify_dir(directory)
    if report.changed or report.missing or report.unlisted:
        raise ArtifactError("artifact files do not match the manifest: " + "; ".join(report.lines()),
                            where=str(directory), fix="rebuild the artifact set")
    m = read_manifest(directory)
    from omegaconf import OmegaConf

    cfg = from_omegaconf(OmegaConf.create(m["recipe"]), recipe=f"{directory}/manifest.json recipe")
    source = open_source(cfg.model.checkpoint, m["family"], cfg.model.revision, Path(cfg.cache_dir),
                         f"{directory}/manifest.json source.checkpoint")
    if source.weight_files != m["source"]["weights"]:
        raise ArtifactError("the source checkpoint's weights differ from the ones this artifact set was built from",
                            where=str(source.path), fix="point at the original checkpoint or rebuild")
    model = load_model(source, cfg.model.trust_remote_code, cfg.model.load_dtype)
    from vlmforge.registry import get_family
    from vlmforge.build import StageOptions

    family = get_family(m["family"])
    size = m["components"]["vision"]["image_size"]
    deepstack = family.deepstack_layers(model.config) > 0 and cfg.model.deepstack == "keep"
    opts = StageOptions(size, deepstack)
    contracts = {s: family.stage(s).contract(model.config, opts) for s in ("vision", "embedding", "decoder")}
    for s, c in contracts.items():
        if c.to_json() != {k: m["components"][s][k] for k in ("inputs", "outputs")}:
            raise ArtifactError(f"manifest contract of {s} differs from what the recipe declares",
                                where=f"{directory}/manifest.json", fix="rebuild the artifact set")
    precisions = {s: m["components"][s]["precision"] for s in contracts}
    dropped = cfg.model.deepstack == "drop" and family.deepstack_layers(model.config) > 0
    params = image_params(source.path, model.config, size, family.image.mean, family.image.std)
    inp = SuiteInputs(m["family"], Path(directory), contracts, precisions, params,
                      deepstack, tuple(cfg.target.providers), deepstack_off=family.deepstack_off if dropped else None)
    return run_suite(inp, model, source.path, cfg.validate, validation_images(cfg.validate)).checks
