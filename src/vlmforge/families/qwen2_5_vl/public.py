"""The public Qwen2.5-VL configs, laid out as the hub's `config.json` files are (for random-weight fixtures at
real size: `vlmforge fixture qwen2_5_vl_3b OUT`).

The hub files predate transformers' nested layout: the text model's keys sit at the top level beside
`vision_config`, the rotary layout is `rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}` with
a top-level `rope_theta`, and `torch_dtype` is bfloat16; transformers 5 reads that layout and maps it to
`text_config.rope_parameters`. Checked against copies of the two hub files found in public repositories
(see the closing note of issue 12): widths, depths, head counts, vocab (151936 tied for 3B, 152064 untied
for 7B), vision (32 blocks x 1280, MLP 3420, 16 heads, window 112, full attention at [7, 15, 23, 31]),
token ids and `rope_scaling`.

The hub checkpoints store their tensors under the legacy names `model.layers.*`, `model.embed_tokens.*`,
`model.norm.*`, `visual.*` and `lm_head.weight` (absent when the head is tied: the 3B ships no lm_head),
which transformers 5 renames on load to `model.language_model.*` / `model.visual.*`.
"""

from __future__ import annotations

import re

_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}


def _config(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
            max_window_layers: int) -> dict:
    """One hub `config.json` of the family; only the widths differ between sizes."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "max_position_embeddings": 128000,
        "max_window_layers": max_window_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {**_VISION, "out_hidden_size": hidden},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


CONFIGS: dict[str, dict] = {
    "qwen2_5_vl_3b": _config(2048, 11008, 36, 16, 2, 151936, True, 70),
    "qwen2_5_vl_7b": _config(3584, 18944, 28, 28, 4, 152064, False, 28),
}

# Parameter counts of the released models, for a cross-check of the configs above (model cards: 3.75 B, 8.29 B).
PUBLISHED_PARAMETERS = {"qwen2_5_vl_3b": 3.75e9, "qwen2_5_vl_7b": 8.29e9}


# The hub tokenizer's added tokens (tokenizer_config.json `added_tokens_decoder`): id -> (text, special).
ADDED_TOKENS = {
    151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True), 151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True), 151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True), 151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True), 151657: ("<tool_call>", False),
    151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", False), 151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False), 151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}


def hub_tensor_name(name: str) -> str:
    """transformers 5's parameter name -> the name the hub checkpoints store (legacy, pre-5 layout)."""
    name = re.sub(r"^model\.language_model\.", "model.", name)
    return re.sub(r"^model\.visual\.", "visual.", name)


def reduce_depth(config: dict, layers: int | None, vision_layers: int | None) -> dict:
    """A copy with fewer decoder layers and/or ViT blocks, keeping the window/full-attention mix: the full
    attention blocks stay every 8th (the last of each 8), or the last block when fewer than 8 remain."""
    out = {**config, "vision_config": dict(config["vision_config"])}
    if layers is not None:
        out["num_hidden_layers"] = layers
    if vision_layers is not None:
        vis = out["vision_config"]
        vis["depth"] = vision_layers
        vis["fullatt_block_indexes"] = [i for i in range(vision_layers) if i % 8 == 7] or [vision_layers - 1]
    return out


def to_nested_rope(config: dict) -> dict:
    """The same config with transformers 5's rotary layout (`rope_parameters` with the theta inside)."""
    out = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    out["rope_parameters"] = {"rope_type": "default", "mrope_section": list(config["rope_scaling"]["mrope_section"]),
                              "rope_theta": config["rope_theta"]}
    return out
