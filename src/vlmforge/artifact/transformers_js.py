"""`vlmforge export-js SET OUT`: a folder transformers.js (npm @huggingface/transformers 4.x) loads as it is.

    vlmforge export-js artifacts/tiny-qwen2_5_vl/fp32-392 js-models/tiny-qwen2_5_vl-392
    node js/greedy.mjs js-models/tiny-qwen2_5_vl-392 --image cat.png --prompt "Describe it." --tokens 16

transformers.js's image-text-to-text classes for these families (models/qwen2_vl/modeling_qwen2_vl.js)
run three sessions from `onnx/`: `vision_encoder` (pixel_values [patches, C*T*P*P], image_grid_thw ->
image_features), `embed_tokens` (input_ids -> inputs_embeds; the image features are merged in JS at the
image-token positions) and `decoder_model_merged` (inputs_embeds, attention_mask, 3-D MRoPE position_ids
it computes itself from image_grid_thw, past_key_values.* -> logits, present.*). So the layout is:

    onnx/vision_encoder<sfx>.onnx        the set's vision graph (its data renamed `*.onnx_data`)
    onnx/embed_tokens<sfx>.onnx(_data)   a Gather over the token table of the set's embedding graph
    onnx/decoder_model_merged<sfx>.onnx  the set's decoder graph
    config.json                          the model facts transformers.js reads + `transformers.js_config`
    preprocessor_config.json             the set's, with the pixel bounds of its vision graph
    tokenizer.json, tokenizer_config.json (chat template), generation_config.json
    export_js.json                       what this folder was made from (and the mark that vlmforge made it)

`<sfx>` is transformers.js's file suffix of the component's dtype ("" for fp32). config.json is written from
the manifest (the set does not carry the checkpoint's config.json): only keys whose values the set knows.

A set whose graphs transformers.js cannot drive is refused, naming the fix: transformers.js feeds the
decoder nothing but the inputs above, so a Qwen3-VL set that keeps DeepStack (a `deepstack_embeds`
decoder input) would fail inside onnxruntime ("missing input"); it must be built with model.deepstack=drop.

Where the vision graph comes from is a parameter (`VisionSource`, by default the set's own): a fixed-size set
gives one with the pixel bounds pinned to the fixed grid (HF's smart_resize keeps an image of exactly that
size, so an image of that size is preprocessed exactly as HF does); a vision=dynamic set gives its own graph,
which takes any grid, with the pixel budget it was built with. transformers.js then picks the grid as HF does
(its smart_resize is HF's), but resizes with its own image code (sharp's affine bicubic in Node), which is not
PIL's: an image that needs resizing gets pixel values close to, not equal to, HF's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlmforge.artifact.manifest import MANIFEST, check_verified
from vlmforge.core.workdirs import owner_tag, remove_stale
from vlmforge.core.contracts import KVLayout, StageContract
from vlmforge.core.errors import ArtifactError, from_os_error
from vlmforge.core.hashing import sha256_file
from vlmforge.core.paths import confine, scan_tree

log = logging.getLogger(__name__)

MARK = "export_js.json"  # written last; its presence and file list tell a layout vlmforge wrote
FORMAT = "vlmforge-transformers.js"
DTYPES = {"fp32": ("fp32", ""), "fp16": ("fp16", "_fp16"), "int4": ("q4", "_q4")}  # precision -> (dtype, suffix)
SESSIONS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
DECODER_FED = ("inputs_embeds", "attention_mask", "position_ids")  # plus past_key_values.*, num_logits_to_keep
VISION_FED = ("pixel_values", "image_grid_thw")
COPIED = ("tokenizer.json", "generation_config.json")
_WORK = re.compile(r"^\..+\.export-js-(?P<tag>.+-\d+)$")


@dataclass(frozen=True)
class VisionSource:
    """Which graph of the set becomes `vision_encoder`, and the pixel bounds its processor must keep to.

    `fixed_hw`: the (height, width) a fixed-shape graph takes, None for a graph that takes any grid."""

    component: str
    min_pixels: int
    max_pixels: int
    fixed_hw: tuple[int, int] | None


def fixed_vision(manifest: dict) -> VisionSource:
    """The fixed-shape vision graph of today's sets: bounds pinned to its one grid, so that transformers.js's
    smart_resize leaves an image of exactly that size as it is (and gives any other size another grid,
    which the graph refuses)."""
    vis = manifest["components"]["vision"]
    pp = vis["preprocess"]
    if not isinstance(vis.get("grid_thw"), list) or len(vis["grid_thw"]) != 3:
        raise ArtifactError("the set's vision component records no fixed grid_thw", where="manifest.json components.vision",
                            fix="pass export_js the VisionSource of this set's vision graph (min/max pixels)")
    _, gh, gw = vis["grid_thw"]
    h, w = int(gh) * int(pp["patch_size"]), int(gw) * int(pp["patch_size"])
    return VisionSource("vision", h * w, h * w, (h, w))


def dynamic_vision(manifest: dict) -> VisionSource:
    """The dynamic-resolution vision graph of a vision=dynamic set: any grid, the pixel budget the set was
    built and validated with (manifest components.vision.preprocess), which transformers.js's smart_resize
    then keeps to exactly as HF's processor does."""
    pp = manifest["components"]["vision"]["preprocess"]
    try:
        lo, hi = int(pp["min_pixels"]), int(pp["max_pixels"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError("the dynamic vision component records no min_pixels/max_pixels",
                            where="manifest.json components.vision.preprocess",
                            fix="rebuild the set with this vlmforge version") from None
    return VisionSource("vision", lo, hi, None)


def vision_source(manifest: dict) -> VisionSource:
    """The set's own vision graph as transformers.js's `vision_encoder`: dynamic or fixed, as built."""
    if manifest["components"]["vision"].get("vision") == "dynamic":
        return dynamic_vision(manifest)
    return fixed_vision(manifest)


def export_js(directory: Path, out: Path, vision: VisionSource | None = None) -> Path:
    """Verify the artifact set `directory`, then write the transformers.js layout `out` atomically (a staging
    folder beside it, one rename). An `out` that exists must be empty or a layout this command wrote."""
    directory, out = Path(directory), Path(out)
    manifest = check_verified(directory, "export-js reads verified artifact sets only")
    if not manifest["validation"]["passed"]:
        raise ArtifactError("the artifact set records no passed validation", where=str(directory / MANIFEST),
                            fix="rebuild it with validation on (`vlmforge export ...`)")
    vision = vision or vision_source(manifest)
    contracts = _contracts(manifest)
    check_loadable(manifest, contracts, vision, str(directory / MANIFEST))
    _check_target(directory, out)
    staging = out.parent / f".{out.name}.export-js-{owner_tag()}"
    needed = sum(f["bytes"] for f in manifest["files"].values())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out.parent, _WORK)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        _write_layout(directory, manifest, contracts, vision, staging)
        _check_target(directory, out)  # nothing appeared at `out` while we wrote
        _swap_in(staging, out)
    except OSError as exc:
        raise from_os_error(exc, "writing the transformers.js layout", where=str(out.parent), needed=needed) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote transformers.js layout %s", out)
    return out


def _contracts(manifest: dict) -> dict[str, StageContract]:
    return {s: StageContract.from_json(s, c) for s, c in manifest["components"].items()
            if isinstance(c, dict) and "inputs" in c and "outputs" in c}


def check_loadable(manifest: dict, contracts: dict, vision: VisionSource, where: str) -> None:
    """Refuse, with the fix, a set whose graphs transformers.js would feed wrongly or not at all."""
    for stage in (vision.component, "embedding", "decoder"):
        if stage not in contracts:
            raise ArtifactError(f"the manifest has no {stage!r} component", where=where, fix="rebuild the artifact set")
    dec, vis, emb = contracts["decoder"], contracts[vision.component], contracts["embedding"]
    KVLayout.from_contract(dec, where=where, error=ArtifactError)
    unfed = [n for n in dec.input_names if n not in DECODER_FED and not n.startswith("past_key_values.")
             and n != "num_logits_to_keep"]
    if unfed:
        deep = manifest["recipe"].get("model", {}).get("deepstack") == "keep" and "deepstack_embeds" in unfed
        raise ArtifactError(
            f"the decoder takes {unfed}, which transformers.js never feeds (it runs the decoder on "
            f"{list(DECODER_FED)} and the KV cache only){'; it has no DeepStack path' if deep else ''}",
            where=where,
            fix=("rebuild the set with model.deepstack=drop (less accurate: HF adds DeepStack features that "
                 "transformers.js cannot)" if deep else "rebuild the set without those decoder inputs"))
    missing = [n for n in DECODER_FED if n not in dec.input_names]
    missing += [n for n in VISION_FED if n not in vis.input_names]
    missing += [] if "image_features" in vis.output_names else ["image_features (vision output)"]
    extra = [n for n in vis.input_names if n not in VISION_FED]
    if missing or extra:
        raise ArtifactError(f"the graphs lack {missing} or take inputs transformers.js never feeds {extra}",
                            where=where, fix="rebuild the set with this vlmforge version")
    past = dec.input("past_key_values.0.key").shape
    if past[0] != "batch_size" or isinstance(past[2], int):
        raise ArtifactError(f"past_key_values.0.key has shape {list(past)}; transformers.js sizes its empty "
                            "cache from the dim names ['batch_size', heads, <any name>, head_dim]", where=where,
                            fix="rebuild the set with this vlmforge version")
    feats, embeds = vis.output("image_features").dtype, emb.output("inputs_embeds").dtype
    if feats != embeds:
        raise ArtifactError(f"image_features are {feats} but inputs_embeds {embeds}: transformers.js merges "
                            "them as they are", where=where,
                            fix="rebuild with the same float I/O type for vision and embedding (precision.fp16_io)")
    for stage in (vision.component, "embedding", "decoder"):
        precision = manifest["components"][stage].get("precision")
        if precision not in DTYPES:
            raise ArtifactError(f"{stage} has precision {precision!r}; transformers.js dtypes are known for "
                                f"{sorted(DTYPES)}", where=where, fix="export a set of one of those precisions")


def _check_target(directory: Path, out: Path) -> None:
    src, dst = directory.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ArtifactError("the layout folder must lie outside the artifact set (and not contain it)",
                            where=str(out), fix="pass an OUT folder beside the artifact set")
    if os.path.islink(out) or (os.path.lexists(out) and not out.is_dir()):
        raise ArtifactError(f"{out} exists and is not a folder", where=str(out), fix="choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not is_layout(out):
        raise ArtifactError(f"{out} exists, is not empty and is not a layout written by `vlmforge export-js`",
                            where=str(out), fix="choose another OUT or remove that folder yourself")


def is_layout(folder: Path) -> bool:
    """`folder` holds exactly the files its export_js.json lists: a layout this command wrote (and may replace)."""
    files, odd = scan_tree(folder)
    mark = folder / MARK
    if odd or MARK not in files or mark.stat().st_size > 1 << 20:
        return False
    try:
        data = json.loads(mark.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT and \
        sorted(data.get("files", {})) == sorted(f for f in files if f != MARK)


def _swap_in(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an empty `out` or an older layout is moved aside first, then removed."""
    staging.chmod(0o755)
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old.export-js-{owner_tag()}"  # removed by remove_stale if we die here
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_layout(directory: Path, manifest: dict, contracts: dict, vision: VisionSource, staging: Path) -> None:
    from vlmforge.artifact import js_graphs as G
    from vlmforge.artifact.js_config import js_config, preprocessor_config, tokenizer_config

    where = str(directory / MANIFEST)
    files = manifest["files"]

    def src(stage: str) -> Path:
        return confine(directory, manifest["components"][stage]["file"], where=where)

    written = {}
    for session, stage in zip(SESSIONS, (vision.component, "embedding", "decoder")):
        dtype, suffix = DTYPES[manifest["components"][stage]["precision"]]
        dst = staging / "onnx" / f"{session}{suffix}.onnx"
        if session == "embed_tokens":
            g = G.write_embed_tokens(src(stage), directory.resolve(), dst, contracts["embedding"], where)
        else:
            g = G.write_relocated(src(stage), directory.resolve(), dst, where, files)
        written[session] = (dtype, g)
    _write_json(staging / "config.json", js_config(manifest, written, vision.component))
    _write_json(staging / "preprocessor_config.json",
                preprocessor_config(_read_json(directory, manifest, "preprocessor_config.json", where), manifest, vision))
    _write_json(staging / "tokenizer_config.json", tokenizer_config(directory, manifest, where))
    for name in COPIED:
        if name in files:
            G.copy_file(confine(directory, name, where=where), staging / name, where)
    _write_mark(staging, directory, manifest, vision)


def _read_json(directory: Path, manifest: dict, name: str, where: str) -> dict:
    if name not in manifest["files"]:
        raise ArtifactError(f"the artifact set has no {name}", where=where,
                            fix=f"rebuild the set (builds copy {name} from the checkpoint)")
    return json.loads(confine(directory, name, where=where).read_text(encoding="utf-8"))


def _write_mark(staging: Path, directory: Path, manifest: dict, vision: VisionSource) -> None:
    files, _ = scan_tree(staging)
    mark = {
        "format": FORMAT,
        "version": 1,
        "client": "@huggingface/transformers 4.x (Node, onnxruntime-node)",
        "source": {"directory": str(directory.resolve()), "manifest_sha256": sha256_file(directory / MANIFEST),
                   "family": manifest["family"]},
        "vision": {"component": vision.component, "min_pixels": vision.min_pixels, "max_pixels": vision.max_pixels,
                   "fixed_hw": list(vision.fixed_hw) if vision.fixed_hw else None},
        "files": {rel: {"sha256": sha256_file(staging / rel), "bytes": (staging / rel).stat().st_size}
                  for rel in files},
    }
    if vision.fixed_hw is None:
        pp = manifest["components"][vision.component]["preprocess"]
        mark["vision"]["known_differences"] = dynamic_differences(int(pp["patch_size"]) * int(pp["merge_size"]))
    _write_json(staging / MARK, mark)


def dynamic_differences(factor: int) -> list[str]:
    """Where transformers.js 4.3's Qwen2-VL image processor (image_processors_utils.js smart_resize, RawImage.resize)
    is not HF's for a dynamic set, so its tokens for such an image can differ from HF `generate`'s (README)."""
    f = factor
    return [
        f"grid: a side of (k + 1/2) x {f} px with k even (e.g. {5 * f // 2}, {25 * f // 2} px) inside the pixel "
        f"budget gets {f} px more than HF gives it: transformers.js rounds half up (Math.round), HF's smart_resize "
        "half to even (Python round); a different grid is a different prompt",
        f"grid: a side below {f} px is first scaled up to {f} px by transformers.js (HF's smart_resize does not), "
        "which can give another grid",
        "pixels: an image that needs resizing is resized with sharp's affine bicubic (Node), not PIL's bicubic: "
        "pixel_values within ~0.36 (normalised) of HF's, and the tokens can differ; an image already on the grid "
        "is not resized by either and matches",
    ]


def _write_json(path: Path, data: dict) -> None:
    with open(path, "x", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
