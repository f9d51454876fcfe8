"""The JSON files of the transformers.js layout (`vlmforge.artifact.transformers_js`), from the manifest.

What transformers.js 4.3 reads, and where (src/ of @huggingface/transformers):
* config.json: `model_type` picks the class (models/registry.js) and, with `text_config.model_type`, the
  normalised config whose `num_layers`/`num_heads`/`dim_kv` name and size the KV cache (configs.js);
  `image_token_id`, `vision_start_token_id`, `vision_config.spatial_merge_size` drive the image-token merge
  and the 3-D MRoPE positions (models/qwen2_vl/modeling_qwen2_vl.js); `transformers.js_config` gives each
  session's `dtype` (the file suffix) and `use_external_data_format` (how many `*.onnx_data` chunks).
* preprocessor_config.json: `processor_class` / `image_processor_type` pick the processor; min/max pixels,
  patch, merge and temporal patch sizes, mean/std and rescale drive its smart_resize and patching.
* tokenizer_config.json: the chat template `apply_chat_template` renders.
Only values the artifact set itself records are written; nothing is guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmforge.core.contracts import KVLayout, StageContract
from vlmforge.core.errors import ArtifactError
from vlmforge.core.paths import confine

PIXEL_KEYS = ("min_pixels", "max_pixels")


def text_model_type(model_type: str) -> str:
    """HF's model_type of the text sub-config of `model_type` (the family key is HF's config.model_type).
    Read from transformers' config class: the configuration module only, no model code, no torch."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        raise ArtifactError(f"transformers has no config class for model_type {model_type!r}",
                            where="manifest.json family", fix="rebuild the set with this vlmforge version") from None
    text = getattr(config_class, "sub_configs", {}).get("text_config")
    if text is None:
        raise ArtifactError(f"{config_class.__name__} has no text_config", where="manifest.json family",
                            fix="transformers.js reads the decoder's facts from config.json's text_config")
    return text.model_type


def js_config(manifest: dict, written: dict, vision_component: str) -> dict:
    """config.json. `written`: session name -> (transformers.js dtype, js_graphs.WrittenGraph);
    `vision_component`: the manifest component the vision encoder comes from."""
    comps, ids = manifest["components"], manifest["token_ids"]
    decoder = StageContract.from_json("decoder", comps["decoder"])
    kv = KVLayout.from_contract(decoder, where="manifest.json components.decoder", error=ArtifactError)
    vocab = decoder.output("logits").shape[-1]
    pp = comps[vision_component]["preprocess"]
    text = {"model_type": text_model_type(manifest["family"]), "hidden_size": kv.hidden, "num_hidden_layers": kv.num_layers,
            "num_key_value_heads": kv.kv_heads, "head_dim": kv.head_dim, "vocab_size": vocab}
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "pad")):
        if ids.get(name) is not None:
            text[key] = ids[name]
    config = {
        "model_type": manifest["family"],
        "image_token_id": ids["image"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "text_config": text,
        "vision_config": {"spatial_merge_size": pp["merge_size"], "patch_size": pp["patch_size"],
                          "temporal_patch_size": pp["temporal_patch_size"]},
        "transformers.js_config": {
            "dtype": {name: dtype for name, (dtype, _) in written.items()},
            "use_external_data_format": {g.path.name: len(g.data) for _, g in written.values() if g.data},
        },
    }
    return config


def preprocessor_config(original: dict, manifest: dict, vision) -> dict:
    """The set's preprocessor_config.json with the grid facts the vision graph was validated with and the
    pixel bounds of `vision` (a VisionSource)."""
    for key in ("processor_class", "image_processor_type"):
        if not isinstance(original.get(key), str):
            raise ArtifactError(f"the set's preprocessor_config.json has no {key}", where="preprocessor_config.json",
                                fix="transformers.js picks its processor by this key; rebuild from a checkpoint "
                                    "whose preprocessor_config.json has it")
    pp = manifest["components"][vision.component]["preprocess"]
    out = dict(original)
    out.update({"patch_size": pp["patch_size"], "merge_size": pp["merge_size"],
                "temporal_patch_size": pp["temporal_patch_size"], "image_mean": pp["mean"], "image_std": pp["std"],
                "min_pixels": vision.min_pixels, "max_pixels": vision.max_pixels,
                "size": {"shortest_edge": vision.min_pixels, "longest_edge": vision.max_pixels}})
    return out


def tokenizer_config(directory: Path, manifest: dict, where: str) -> dict:
    """The set's tokenizer_config.json, with the chat template of chat_template.jinja when it has none."""
    files = manifest["files"]
    if "tokenizer_config.json" not in files or "tokenizer.json" not in files:
        raise ArtifactError("the artifact set has no tokenizer.json / tokenizer_config.json", where=where,
                            fix="rebuild the set (builds copy the checkpoint's tokenizer files)")
    cfg = json.loads(confine(directory, "tokenizer_config.json", where=where).read_text(encoding="utf-8"))
    if not cfg.get("chat_template"):
        if "chat_template.jinja" not in files:
            raise ArtifactError("the artifact set has no chat template", where=where,
                                fix="rebuild from a checkpoint with a chat template (transformers.js renders prompts with it)")
        cfg["chat_template"] = confine(directory, "chat_template.jinja", where=where).read_text(encoding="utf-8")
    return cfg
