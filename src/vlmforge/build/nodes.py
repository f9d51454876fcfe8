"""The work of each kind of build node (vlmforge.build.plan lists the nodes, vlmforge.build.execute runs them).

Each is `run(build, node, folder) -> record`: it writes its files into `folder` (a cache entry's temporary
folder, or the staging folder for the nodes that are not cached) and returns the JSON record kept with them.
It may read what its declared dependencies put into the staging or scratch folders, and `build.records`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vlmforge import __version__
from vlmforge.artifact.manifest import MANIFEST, hash_files, toolchain, validate_manifest
from vlmforge.build.publish_dir import VALIDATION_FILE, park_failed
from vlmforge.config import to_dict
from vlmforge.core.errors import ValidationFailed
from vlmforge.core.hashing import sha256_file
from vlmforge.host.sizes import FixedSize, size_hw, size_json
from vlmforge.loading import stage_model
from vlmforge.registry import STAGES
from vlmforge.source import TOKENIZER_FILES, checkpoint_file
from vlmforge.transforms import TRANSFORMS
from vlmforge.validators.results import CheckResult

log = logging.getLogger(__name__)

RUNTIME_FILES = TOKENIZER_FILES + ("preprocessor_config.json", "generation_config.json")
# The options each stage's export reads (StageOptions fields). Image size reaches the vision graph only, so
# vision=small and vision=large share one embedding and one decoder export. The pixel budget of a dynamic
# build shapes no graph (the dynamic vision graph takes any grid): only the preprocessing and the validation.
STAGE_READS = {"vision": ("image_size", "deepstack"), "embedding": ("deepstack",), "decoder": ("deepstack",)}


@dataclass(frozen=True)
class StageOptions:
    image_size: FixedSize | None  # a side or (height, width); None: vision=dynamic (the family's dynamic_vision stage)
    deepstack: bool
    min_pixels: int | None = None  # vision=dynamic: the smart_resize pixel budget (resolved, never None there)
    max_pixels: int | None = None

    @property
    def dynamic(self) -> bool:
        return self.image_size is None


def stage_options(stage: str, options: StageOptions) -> StageOptions:
    """The options an export sees: only those its cache key holds (STAGE_READS); the others are None, so a
    stage that starts reading one fails loudly instead of reusing a graph built for another value."""
    return StageOptions(**{k: (v if k in STAGE_READS[stage] else None) for k, v in dataclasses.asdict(options).items()})


def stage_spec(b, stage: str):
    """The family's StageSpec of `stage` in this build (the dynamic vision stage for vision=dynamic)."""
    return b.family.stage(stage, dynamic=b.options.dynamic)


# Stages exported with their large weights streamed from the checkpoint (vlmforge.loading.StandIns): the graph
# structure is traced over stand-ins and each weight is written from its checkpoint tensor alone. Every stage:
# the families' export modules compute from their weights only inside the graph (the position tables' resampling
# is a Gather of the table), so no value of a stand-in is read while the module is built or traced, and constant
# folding never computes from one (exporters.onnx_export.optimize_graph).
STREAMED = ("vision", "embedding", "decoder")


# -- graphs ----------------------------------------------------------------------------------------------------------
def export(b, node, folder: Path) -> dict:
    stage = node.stage
    log.info("%s: exporting", node.label)
    t = time.perf_counter()
    # Only the stage's weights, freed after it (vlmforge.loading); a model already loaded whole is used as it is.
    with b.progress.step(f"{stage}: exporting"), stage_model(
            b.source, b.hf_config, stage, b.cfg.model.load_dtype, b._model, streamed=stage in STREAMED) as model:
        stage_spec(b, stage).export(model, stage_options(stage, b.options), folder / f"{stage}.onnx")
    b.timings[node.timing] = time.perf_counter() - t
    return {"contract": b.contracts[stage].to_json()}


def export_transformed(b, node, folder: Path) -> dict:
    """A stage exported straight to its precision: the transform runs on the export's structure as it is saved
    (exporters.onnx_export.transformed_on_save), its weights read from the checkpoint (a streamed stage) or from
    an FP32 graph in the export's own scratch folder; the same bytes as export then transform, without the FP32
    graph in the cache or the set."""
    from vlmforge.exporters.onnx_export import transformed_on_save

    stage, precision = node.stage, node.inputs["transform"]["precision"]
    row = TRANSFORMS[precision]
    log.info("%s: exporting to %s", node.label, precision)
    t = time.perf_counter()
    function, kwargs = row.resolve_on_export(), transform_kwargs(b, stage, row)

    def on_save(structure, src, dst):
        return function(structure, src, dst, **kwargs)

    dst = folder / f"{stage}.onnx"
    with b.progress.step(f"{stage}: exporting to {precision}"), transformed_on_save(on_save) as record, stage_model(
            b.source, b.hf_config, stage, b.cfg.model.load_dtype, b._model, streamed=stage in STREAMED) as model:
        stage_spec(b, stage).export(model, stage_options(stage, b.options), dst)
    b.timings[node.timing] = time.perf_counter() - t
    record = dict(record)
    sources = record.pop("source_weights", None)
    record.update(bytes=graph_bytes(dst), fused_with_export=True)
    return {"contract": b.contracts[stage].to_json(), "transform": record, "source_weights": sources}


def transform(b, node, folder: Path) -> dict:
    """The FP32 graph (put in scratch by the executor) through the table's function, plus the sizes."""
    stage, precision = node.stage, node.inputs["precision"]
    row = TRANSFORMS[precision]
    log.info("%s: transforming to %s", stage, precision)
    t = time.perf_counter()
    src, dst = b.scratch / f"{stage}.onnx", folder / f"{stage}.onnx"
    with b.progress.step(f"{stage}: {precision} transform"):
        record = row.resolve()(src, dst, **transform_kwargs(b, stage, row))
    fp32_bytes = graph_bytes(src)
    record.update(fp32_bytes=fp32_bytes, bytes=graph_bytes(dst), size_ratio=round(graph_bytes(dst) / fp32_bytes, 4))
    b.timings[node.timing] = time.perf_counter() - t
    sources = record.pop("source_weights", None)
    return {"transform": record, "source_weights": sources}


def transform_kwargs(b, stage: str, row) -> dict:
    """The keyword arguments of a transform row's function in this build: the recipe values it declares and the
    build facts it asks for (transforms.CONTEXT)."""
    params = {kw: getattr(b.cfg.precision, key) for kw, key in row.params.items()}
    facts = {"stage": stage, "vocab": b.hf_config.text_config.vocab_size if stage == "decoder" else None}
    return {**params, **{k: facts[k] for k in row.context}}


def graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# -- the set around the graphs ---------------------------------------------------------------------------------------
def runtime_configs(b, node, staging: Path) -> dict:
    """Tokenizer and processor files from the checkpoint, and the runtime configs written from the contracts."""
    from vlmforge.artifact.runtime_configs import write_runtime_configs
    from vlmforge.host.image import dynamic_image_params, image_params

    _copy_runtime_files(b.source.path, staging)
    mean, std = b.family.image.mean, b.family.image.std
    if b.options.dynamic:
        b.params = dynamic_image_params(b.source.path, b.hf_config, b.options.min_pixels, b.options.max_pixels, mean, std)
    else:
        b.params = image_params(b.source.path, b.hf_config, b.options.image_size, mean, std)
    write_runtime_configs(staging, b.family.key, b.family.genai_type, b.hf_config, b.final_contracts, b.params,
                          b.deepstack)
    return {}


def _copy_runtime_files(src: Path, dst: Path) -> None:
    """Tokenizer and processor files into the set, each confined to the checkpoint (checkpoint_file)."""
    for name in RUNTIME_FILES:
        if (src / name).is_file():
            real = checkpoint_file(src, name, f"checkpoint file {name}")
            if real != src.resolve() / name:
                log.info("%s: copied from %s (a link in the checkpoint)", name, real)
            shutil.copyfile(real, dst / name)


def validation(b, node, folder: Path) -> dict:
    """Every check of the staged set against the PyTorch model (transformed graphs also against their FP32
    graphs, which the executor put in scratch)."""
    from vlmforge.validators.suite import SuiteInputs, run_suite

    t = time.perf_counter()
    cfg, family = b.cfg, b.family
    log.info("validating against PyTorch (a reference pass, the model freed, then a graph pass)")
    with b.progress.step("validating against PyTorch"):
        dropped = cfg.model.deepstack == "drop" and family.deepstack_layers(b.hf_config) > 0
        transformed = any(p != "fp32" for p in b.precision.values())
        sources = {s: (b.records.get(f"transform.{s}.{p}") or {}).get("source_weights") or {}
                   for s, p in b.precision.items() if p == "int4"}
        inp = SuiteInputs(family.key, b.staging, b.final_contracts, dict(b.precision), b.params, b.deepstack,
                          tuple(cfg.target.providers), deepstack_off=family.deepstack_off if dropped else None,
                          fp32_directory=b.scratch if transformed else None, reference=b.reference,
                          fp32_stages=tuple(d.split(".")[1] for d in node.scratch), source_weights=sources)
        # run_suite takes the model (b.take_model) for its PyTorch pass and frees it before the graph pass
        images = validation_images(cfg.validate, b.options.dynamic, b.options.image_size)
        result = run_suite(inp, b.take_model, b.source.path, cfg.validate, images)
    b.timings[node.timing] = time.perf_counter() - t
    b.checks = (result.checks, result.variant)  # as measured; the record holds them rounded (CheckResult.to_json)
    return {"checks": [c.to_json() for c in result.checks], "variant": result.variant}


# (width, height) of the built-in validation images of a dynamic build, one per seed in turn: a square, an odd
# size smart_resize has to round (451x300), a portrait; none a multiple of the patch factor
DYNAMIC_SIZES = ((500, 500), (451, 300), (300, 620))


def validation_images(vcfg, dynamic: bool = False, size=None) -> list:
    """The user's images, or the built-in ones: squares for a square size; for a non-square size (height,
    width) images of exactly that size; for a dynamic build one image per aspect ratio of DYNAMIC_SIZES (at
    least three, seeds reused in turn). A fixed set's HF reference is HF's processor with min = max = H*W
    pixels, which keeps an image of exactly H x W (and resizes a square into a square set alike); any other
    user image is first fitted to the set as the runtime fits it (`fit_image`), so both sides see one grid."""
    from vlmforge.host.preprocess import load_image

    if vcfg.images:
        images = [load_image(p) for p in vcfg.images]
        return images if dynamic or size is None else [fit_image(img, size, i) for i, img in enumerate(images)]
    from vlmforge.fixtures.images import sample_image

    if not dynamic:
        h, w = size_hw(size) if size is not None else (500, 500)
        shape = (500, 500) if h == w else (w, h)  # sample_image takes (width, height)
        return [sample_image(seed, size=shape) for seed in vcfg.image_seeds]
    n = max(len(vcfg.image_seeds), len(DYNAMIC_SIZES))
    return [sample_image(vcfg.image_seeds[i % len(vcfg.image_seeds)], size=DYNAMIC_SIZES[i % len(DYNAMIC_SIZES)])
            for i in range(n)]


def fit_image(image, size, index: int = 0):
    """A user's validation image as a fixed set of `size` takes it: kept if it is already H x W (or a square
    for a square set), else converted to RGB and stretched to H x W (BICUBIC), as the runtime does."""
    from PIL import Image

    from vlmforge.host.preprocess import to_rgb

    h, w = size_hw(size)
    if image.size == (w, h) or (h == w and image.size[0] == image.size[1]):
        return image
    log.info("validation image %d (%dx%d) stretched to the set's %dx%d (width x height), as the runtime fits it",
             index, image.size[0], image.size[1], w, h)
    return to_rgb(image).resize((w, h), resample=Image.Resampling.BICUBIC)


def checks_of(b) -> tuple[list[CheckResult], dict]:
    """The checks of this build: as measured if the validation ran, else from its cache entry."""
    if b.checks is not None:
        return b.checks
    record = b.records.get("validation")
    if record is None:
        return [], {}
    return [CheckResult(**c) for c in record["checks"]], record.get("variant") or {}


def manifest(b, node, staging: Path) -> dict:
    """The manifest of the staged set, validated (a bad manifest publishes nothing); a set whose checks
    failed is parked as <name>.failed/ instead."""
    checks, variant = checks_of(b)
    if not all(c.passed for c in checks):
        failed_dir = park_failed(staging, b.final, checks)
        bad = [c for c in checks if not c.passed]
        raise ValidationFailed(
            f"{len(bad)} of {len(checks)} checks failed: " + "; ".join(f"{c.stage}/{c.name} {c.metric}={c.value} > {c.tolerance}" for c in bad[:4]),
            where=str(failed_dir / VALIDATION_FILE),
            fix="inspect the failing stage; tolerances live in recipes/validate/*.yaml (never loosen them to pass)",
        )
    data = _manifest(b.cfg, b.family.key, b.source, b.final_contracts, b.params, checks, staging, b.staged)
    for stage in STAGES:
        record = b.records.get(f"transform.{stage}.{b.precision[stage]}")
        if record is not None:
            data["components"][stage]["transform"] = record["transform"]
    if variant:
        data["variant"] = variant
    if checks:  # what the checks compared against: PyTorch at the load dtype, its weights resident or streamed
        data["validation"]["reference"] = {"model": "transformers", "dtype": b.cfg.model.load_dtype,
                                           "weights": b.reference}
    validate_manifest(data, str(staging / MANIFEST))
    return data


def _manifest(cfg, family_key, source, contracts, params, checks, staging: Path, known: dict | None = None) -> dict:
    comps = {}
    for stage, c in contracts.items():
        comp = {"file": f"{stage}.onnx", "precision": getattr(cfg.precision, stage), **c.to_json()}
        if stage == "vision" and getattr(params, "size", None) is None:  # vision=dynamic
            comp.update(vision="dynamic", preprocess=params.to_json())
        elif stage == "vision":
            comp.update(image_size=size_json(params.size), tokens_per_image=params.tokens_per_image,
                        grid_thw=params.grid_thw, preprocess=params.to_json())
        comps[stage] = comp
    mc = load_config_ids(source.config)
    return {
        "schema_version": 1,
        "vlmforge_version": __version__,
        "family": family_key,
        "source": {"checkpoint": cfg.model.checkpoint, "revision": cfg.model.revision, "weights": source.weight_files,
                   "config_sha256": source_config_sha256(source.path)},
        "recipe": {k: v for k, v in to_dict(cfg).items() if k not in ("out_dir", "cache_dir", "memory_check")},  # where it ran is not what it is
        "toolchain": toolchain(),
        "components": comps,
        "files": hash_files(staging, known),
        "token_ids": mc,
        "validation": {"passed": all(c.passed for c in checks) and bool(checks), "checks": [c.to_json() for c in checks]},
    }


def source_config_sha256(path: Path) -> str:
    """sha256 of the checkpoint's config.json: `validate` tells a changed config from changed artifacts."""
    return sha256_file(checkpoint_file(path, "config.json", "checkpoint config.json"))


def load_config_ids(config: dict) -> dict:
    text = config.get("text_config", {})
    eos = text.get("eos_token_id", config.get("eos_token_id"))
    return {
        "image": config["image_token_id"],
        "vision_start": config["vision_start_token_id"],
        "vision_end": config["vision_end_token_id"],
        "eos": eos,
        "pad": text.get("pad_token_id", config.get("pad_token_id")),
        "bos": text.get("bos_token_id", config.get("bos_token_id")),
    }
