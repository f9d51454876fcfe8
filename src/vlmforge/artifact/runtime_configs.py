"""Runtime configs written beside every artifact set; the build calls `write_runtime_configs`.

* `runtime_config.json` (always): what vlmforge's own runtime needs beyond the manifest's contracts —
  the context length (the text model's `max_position_embeddings`), the EOS/pad ids generation stops and
  pads with, and whether onnxruntime-genai can load the set (and why not).
* `genai_config.json` + `processor_config.json` (only when onnxruntime-genai 0.18 runs the set
  faithfully: Qwen2.5-VL always, Qwen3-VL only with DeepStack dropped — 0.18 has no DeepStack path,
  field notes §9). Its JSON parser rejects unknown keys, so this file holds nothing of vlmforge's own.
  Schema: `src/config.cpp` of microsoft/onnxruntime-genai (Model_Element, Decoder_Element,
  Embedding_Element, Vision_Element, Search_Element); the family's model type (FamilySpec.genai_type) without
  a `decoder.pipeline` selects its MultiModalLanguageModel (vision -> embedding -> decoder sessions,
  3-D MRoPE positions computed by the runtime, vision run once per image with `image_grid_thw [1, 3]`).
* `processor_config.json`: the onnxruntime-extensions image pipeline DecodeImage -> ConvertRGB ->
  Resize -> Rescale -> Normalize -> PatchImage. ConvertRGB is required (without it pixels differ from HF's
  by up to ~3.7). Resize: `smart_resize: 0` and the fixed side for a fixed-size set; for a vision=dynamic
  set `smart_resize: 1` with the set's min/max pixels (HF's smart_resize, aspect ratio kept). Its
  smart_resize and resize are not HF's everywhere (`dynamic_differences`, recorded in runtime_config.json
  as genai.known_differences): no processor_config attribute changes either (Resize takes height, width,
  keep_aspect_ratio, interpolation, smart_resize, min/max_pixels, patch/merge size).

The decoder concatenates past and new keys/values, so `search.past_present_share_buffer` must be false
(a shared buffer needs a fused attention kernel that writes in place).
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmforge.core.contracts import KVLayout
from vlmforge.core.errors import ContractError
from vlmforge.host.tokens import eos_ids, pad_id

GENAI_CONFIG = "genai_config.json"
PROCESSOR_CONFIG = "processor_config.json"
RUNTIME_CONFIG = "runtime_config.json"


def genai_loadable(family_key: str, genai_type: str | None, deepstack: bool) -> tuple[bool, str]:
    """(loadable, reason) for onnxruntime-genai 0.18; `genai_type` is the family's FamilySpec.genai_type."""
    if not genai_type:
        return False, f"onnxruntime-genai has no model type for family {family_key!r}"
    if deepstack:
        return False, ("onnxruntime-genai 0.18 has no DeepStack path; build with model.deepstack=drop for a "
                       "genai-loadable (less accurate) Qwen3-VL artifact set")
    return True, ""


def write_runtime_configs(directory: Path, family_key: str, genai_type: str | None, hf_config, contracts: dict, params,
                          deepstack: bool) -> list[Path]:
    """Write the runtime config files into `directory`; return their paths. `genai_type` is the family's
    onnxruntime-genai model type (None: the runtime cannot load the family)."""
    directory = Path(directory)
    tc = hf_config.text_config
    ids = token_ids(hf_config, _generation_config(directory))
    loadable, reason = genai_loadable(family_key, genai_type, deepstack)
    runtime = {
        "format": "vlmforge-runtime",
        "version": 1,
        "family": family_key,
        "context_length": int(tc.max_position_embeddings),
        "eos_token_ids": ids["eos"],
        "pad_token_id": ids["pad"],
        "genai": {"loadable": loadable, "reason": reason},
    }
    if loadable and getattr(params, "dynamic", False):
        runtime["genai"]["known_differences"] = dynamic_differences(params)
    written = [_write_json(directory / RUNTIME_CONFIG, runtime)]
    if loadable:
        genai = genai_config(genai_type, hf_config, contracts, params, ids)
        written.append(_write_json(directory / GENAI_CONFIG, genai))
        written.append(_write_json(directory / PROCESSOR_CONFIG, processor_config(family_key, genai_type, params)))
    return written


def dynamic_differences(params) -> list[str]:
    """Where onnxruntime-genai 0.18's smart_resize pipeline (onnxruntime-extensions' Resize) is not HF's
    processor, so its tokens for such an image can differ from HF `generate`'s (measured: README)."""
    f = int(params.factor)
    return [
        f"grid: a side of (k + 1/2) x {f} px with k even (e.g. {5 * f // 2}, {25 * f // 2} px) inside the pixel "
        f"budget gets {f} px more than HF gives it: onnxruntime-extensions rounds half away from zero (std::round), "
        "HF's smart_resize half to even (Python round); a different grid is a different prompt",
        f"grid: a side below {f} px, or an image below min_pixels whose scaled-up side lands less than 1 px above "
        f"a multiple of {f}, can get another size (extensions clamps each rounded side to at least {f} px and "
        "truncates the scaled side before its ceil)",
        "pixels: an image whose height the resize shrinks clearly more than its width (e.g. 300x620 -> 308x616, "
        "1000x600 -> 1008x588) differs in pixel_values by up to ~0.36 (normalised): Pillow 13 resizes it "
        "vertically first (python-pillow/Pillow#9549), the Pillow resample code inside onnxruntime-extensions "
        "always horizontally first",
    ]


def token_ids(hf_config, generation_config: dict) -> dict:
    """EOS list (generation_config first, then the text config's, de-duplicated), pad, bos."""
    tc = hf_config.text_config
    eos = list(eos_ids(generation_config.get("eos_token_id"), getattr(tc, "eos_token_id", None),
                       getattr(hf_config, "eos_token_id", None)))
    pad = pad_id(generation_config.get("pad_token_id", getattr(tc, "pad_token_id", None)), eos)
    bos = generation_config.get("bos_token_id", getattr(tc, "bos_token_id", None))
    return {"eos": eos, "pad": pad, "bos": bos}


def _decoder_section(dec, tc, kv: dict) -> dict:
    """genai_config.json's model.decoder: the graph's sizes and its I/O names (KV names as patterns)."""
    return {
        "filename": "decoder.onnx",
        "hidden_size": int(tc.hidden_size),
        "num_attention_heads": int(tc.num_attention_heads),
        "num_key_value_heads": kv["kv_heads"],
        "num_hidden_layers": kv["num_layers"],
        "head_size": kv["head_dim"],
        "inputs": {
            "inputs_embeds": _need(dec, "inputs", "inputs_embeds"),
            "attention_mask": _need(dec, "inputs", "attention_mask"),
            "position_ids": _need(dec, "inputs", "position_ids"),
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": _need(dec, "outputs", "logits"),
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }


def _search(context: int) -> dict:
    """genai_config.json's search: greedy defaults up to the full context (the runtime's options override them)."""
    return {
        "do_sample": False,
        "num_beams": 1,
        "num_return_sequences": 1,
        "max_length": context,
        "min_length": 0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
        "early_stopping": True,
        "past_present_share_buffer": False,
    }


def genai_config(genai_type: str, hf_config, contracts: dict, params, ids: dict) -> dict:
    tc = hf_config.text_config
    dec, emb, vis = contracts["decoder"], contracts["embedding"], contracts["vision"]
    kv = _kv_dims(dec)
    context = int(tc.max_position_embeddings)
    model = {
        "type": genai_type,
        "context_length": context,
        "vocab_size": int(tc.vocab_size),
        "eos_token_id": ids["eos"],
        "pad_token_id": int(ids["pad"]),
        "image_token_id": int(hf_config.image_token_id),
        "vision_start_token_id": int(hf_config.vision_start_token_id),
        "decoder": _decoder_section(dec, tc, kv),
        "embedding": {
            "filename": "embedding.onnx",
            "inputs": {"input_ids": _need(emb, "inputs", "input_ids"), "image_features": _need(emb, "inputs", "image_features")},
            "outputs": {"inputs_embeds": _need(emb, "outputs", "inputs_embeds")},
        },
        "vision": {
            "filename": "vision.onnx",
            "config_filename": PROCESSOR_CONFIG,
            "spatial_merge_size": int(params.merge_size),
            "patch_size": int(params.patch_size),
            "inputs": {"pixel_values": _need(vis, "inputs", "pixel_values"), "image_grid_thw": _need(vis, "inputs", "image_grid_thw")},
            "outputs": {"image_features": _need(vis, "outputs", "image_features")},
        },
    }
    if ids.get("bos") is not None:
        model["bos_token_id"] = int(ids["bos"])
    video = getattr(hf_config, "video_token_id", None)
    if video is not None:
        model["video_token_id"] = int(video)
    vc = hf_config.vision_config
    if getattr(vc, "tokens_per_second", None) is not None:
        model["vision"]["tokens_per_second"] = float(vc.tokens_per_second)
    if getattr(vc, "window_size", None) is not None:
        model["vision"]["window_size"] = int(vc.window_size)
    return {"model": model, "search": _search(context)}


def processor_config(family_key: str, genai_type: str, params) -> dict:
    """The onnxruntime-extensions image pipeline; `Normalize` carries the genai model type as a flag."""
    def op(name: str, kind: str, **attrs) -> dict:
        out = {"name": name, "type": kind}
        if attrs:
            out["attrs"] = attrs
        return {"operation": out}

    return {
        "processor": {
            "name": f"{family_key}_image_processor",
            "transforms": [
                op("decode_image", "DecodeImage", color_space="RGB"),
                op("convert_to_rgb", "ConvertRGB"),
                op("resize", "Resize", **_resize_attrs(params)),
                op("rescale", "Rescale", rescale_factor=1 / 255),
                op("normalize", "Normalize", mean=list(params.mean), std=list(params.std), **{genai_type: 1}),
                op("patch_image", "PatchImage", patch_size=int(params.patch_size),
                   temporal_patch_size=int(params.temporal_patch_size), merge_size=int(params.merge_size)),
            ],
        }
    }


def _resize_attrs(params) -> dict:
    """The Resize step: a fixed set's one side (`smart_resize: 0`), or a dynamic set's pixel budget
    (`smart_resize: 1`: HF's smart_resize within [min_pixels, max_pixels], aspect ratio kept)."""
    grid = {"patch_size": int(params.patch_size), "merge_size": int(params.merge_size)}
    if getattr(params, "dynamic", False):
        return {"smart_resize": 1, "min_pixels": int(params.min_pixels), "max_pixels": int(params.max_pixels), **grid}
    return {"width": params.hw[1], "height": params.hw[0], "smart_resize": 0, **grid}


def _kv_dims(dec) -> dict:
    layout = KVLayout.from_contract(dec, where="decoder contract (vlmforge.artifact.runtime_configs)")
    return {"num_layers": layout.num_layers, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim}


def _need(contract, side: str, name: str) -> str:
    names = contract.input_names if side == "inputs" else contract.output_names
    if name not in names:
        raise ContractError(
            f"{contract.stage} contract has no {side[:-1]} {name!r} (it has {names})",
            where=f"{contract.stage} contract (vlmforge.artifact.runtime_configs)",
            fix="onnxruntime-genai binds graph I/O by these names; keep the onnxruntime-genai naming in the contract",
        )
    return name


def _generation_config(directory: Path) -> dict:
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
