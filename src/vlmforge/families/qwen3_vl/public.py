"""The public Qwen3-VL configs (2B, 4B, 8B), laid out as the hub's `config.json` files are (for random-weight
fixtures at real size: `vlmforge fixture qwen3_vl_4b OUT`).

The hub files (written by transformers 4.57) nest the text model under `text_config` (model_type
`qwen3_vl_text`, `dtype` bfloat16) and give the rotary layout as `rope_scaling: {"mrope_interleaved": true,
"mrope_section": [24, 20, 20], "rope_type": "default"}` beside `rope_theta` 5e6; transformers 5 writes the
same as `rope_parameters` with the theta inside (`to_nested_rope`). Checked against copies of the 4B and 8B
hub files and the 2B dims in public repositories (see the closing note of issue 12): widths, depths, heads
(head_dim 128), vocab 151936, tied 2B/4B and untied 8B heads, vision (24 x 1024 / MLP 4096 for 2B and 4B,
27 x 1152 / MLP 4304 for 8B, 2304 position embeddings), DeepStack blocks ([5, 11, 17] and [8, 16, 24]).

The hub checkpoints store tensors under transformers 5's own names (`model.language_model.*`,
`model.visual.*`, `lm_head.weight`, the latter absent when tied).
"""

from __future__ import annotations


def _vision(depth: int, hidden: int, mlp: int, out: int, deepstack: list[int]) -> dict:
    return {
        "deepstack_visual_indexes": deepstack,
        "depth": depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": out,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _config(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, tied: bool, vision: dict) -> dict:
    """One hub `config.json` of the family."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655,
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "dtype": "bfloat16",
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "initializer_range": 0.02,
            "intermediate_size": mlp,
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": tied,
            "use_cache": True,
            "vocab_size": 151936,
        },
        "tie_word_embeddings": tied,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": 151656,
        "vision_config": vision,
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }


CONFIGS: dict[str, dict] = {
    "qwen3_vl_2b": _config(2048, 6144, 28, 16, 8, True, _vision(24, 1024, 4096, 2048, [5, 11, 17])),
    "qwen3_vl_4b": _config(2560, 9728, 36, 32, 8, True, _vision(24, 1024, 4096, 2560, [5, 11, 17])),
    "qwen3_vl_8b": _config(4096, 12288, 36, 32, 8, False, _vision(27, 1152, 4304, 4096, [8, 16, 24])),
}

# Parameter counts of the released models (model cards / hub listings: 2B, 4.44 B, 8.77 B), a cross-check.
PUBLISHED_PARAMETERS = {"qwen3_vl_2b": 2.13e9, "qwen3_vl_4b": 4.44e9, "qwen3_vl_8b": 8.77e9}


# The hub tokenizer's added tokens (Qwen2's, plus Qwen3's tool-response and think tokens) (tokenizer_config.json `added_tokens_decoder`): id -> (text, special).
ADDED_TOKENS = {
    151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True), 151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True), 151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True), 151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True), 151657: ("<tool_call>", False),
    151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", False), 151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False), 151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False), 151665: ("<tool_response>", False), 151666: ("</tool_response>", False),
    151667: ("<think>", False), 151668: ("</think>", False),
}


def hub_tensor_name(name: str) -> str:
    """The hub checkpoints use transformers 5's names unchanged."""
    return name


def reduce_depth(config: dict, layers: int | None, vision_layers: int | None) -> dict:
    """A copy with fewer decoder layers and/or ViT blocks. DeepStack blocks scale with the depth
    (i -> i * new_depth // depth, duplicates dropped): HF looks a block's merger up by its first position
    in the list, so a repeated index would silently reuse one merger."""
    out = {**config, "text_config": dict(config["text_config"]), "vision_config": dict(config["vision_config"])}
    if layers is not None:
        out["text_config"]["num_hidden_layers"] = layers
    if vision_layers is not None:
        vis = out["vision_config"]
        depth = vis["depth"]
        vis["deepstack_visual_indexes"] = sorted({i * vision_layers // depth for i in vis["deepstack_visual_indexes"]})
        vis["depth"] = vision_layers
    return out


def to_nested_rope(config: dict) -> dict:
    """The same config with transformers 5's rotary layout (`rope_parameters` with the theta inside)."""
    text = {k: v for k, v in config["text_config"].items() if k not in ("rope_scaling", "rope_theta")}
    text["rope_parameters"] = {**config["text_config"]["rope_scaling"], "rope_theta": config["text_config"]["rope_theta"]}
    return {**config, "text_config": text}
