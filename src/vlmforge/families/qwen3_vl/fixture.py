"""Tiny Qwen3-VL checkpoint built offline in code: DeepStack, interpolated position embedding, interleaved MRoPE."""

from __future__ import annotations

from pathlib import Path

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


def image_processor_config() -> dict:
    """`preprocessor_config.json` of the fixture, laid out like the real Qwen3-VL checkpoints'.

    Patch 16 x merge 2 = 32, mean/std 0.5; min/max pixels are Qwen3-VL's own (256^2 .. 4096^2), so 384
    and 672 (multiples of 32) pass through smart_resize unchanged. Like the hub files it names
    `Qwen2VLImageProcessorFast`; transformers 5.23 loads that name as `Qwen2VLImageProcessorPil` when
    torchvision is missing (checked in tests/test_fixtures.py).
    """
    return {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096},
    }


def build_model(seed: int = 0):
    """The tiny model in eval mode with deterministic, perturbed weights (see fixtures.checkpoint.perturb_)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from vlmforge.fixtures.checkpoint import perturb_

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config())
    return perturb_(model, seed).eval()


def write_fixture(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny Qwen3-VL checkpoint folder (weights, tokenizer, processor/generation configs)."""
    from vlmforge.fixtures.checkpoint import write_hf_folder
    from vlmforge.fixtures.tokenizer import build_tokenizer

    return write_hf_folder(build_model(seed), build_tokenizer(), image_processor_config(), Path(out_dir))


def trained_config_dict() -> dict:
    """The config of the trained fixture (`vlmforge.fixtures.train`): the tiny config (DeepStack at vision
    blocks 0 and 2, interleaved MRoPE, GQA, merge 2) with rope_theta 10.

    Why: with head_dim 16 each MRoPE axis gets 2-3 frequency pairs; at theta 5e6 the spatial axes barely
    rotate, so positions in the image are nearly invisible to the language model. At theta 10 they turn
    0.1-1 rad per position: the trained model uses the 3-D positions, and an export that gets them wrong
    loses task accuracy.
    """
    cfg = tiny_config_dict()
    cfg["text_config"] = {
        **cfg["text_config"],
        "rope_parameters": {**cfg["text_config"]["rope_parameters"], "rope_theta": 10.0},
    }
    return cfg
