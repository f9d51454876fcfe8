"""Tiny Qwen3-VL checkpoint built offline in code: DeepStack, interpolated position embedding, interleaved MRoPE."""

from __future__ import annotations

from vlmforge.fixtures import tokens as T


def tiny_config_dict() -> dict:
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": T.IMAGE_TOKEN_ID,
        "video_token_id": T.VIDEO_TOKEN_ID,
        "vision_start_token_id": T.VISION_START_TOKEN_ID,
        "vision_end_token_id": T.VISION_END_TOKEN_ID,
        "tie_word_embeddings": True,
        "text_config": {
            "vocab_size": T.VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
                "rope_theta": 5000000.0,
            },
            "bos_token_id": T.BOS_TOKEN_ID,
            "eos_token_id": T.EOS_TOKEN_ID,
            "pad_token_id": T.PAD_TOKEN_ID,
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "depth": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 2],
        },
    }


def tiny_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**{k: v for k, v in tiny_config_dict().items() if k not in ("model_type", "architectures")})
