"""Tiny Qwen2.5-VL checkpoint built offline in code, keeping the structure that breaks exports."""

from __future__ import annotations

from pathlib import Path

from vlmforge.fixtures import tokens as T


def tiny_config_dict() -> dict:
    """GQA, mrope_section, patch 14, spatial merge 2, window attention with full-attention blocks."""
    return {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "image_token_id": T.IMAGE_TOKEN_ID,
        "video_token_id": T.VIDEO_TOKEN_ID,
        "vision_start_token_id": T.VISION_START_TOKEN_ID,
        "vision_end_token_id": T.VISION_END_TOKEN_ID,
        "tie_word_embeddings": False,
        "text_config": {
            "vocab_size": T.VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            "bos_token_id": T.BOS_TOKEN_ID,
            "eos_token_id": T.EOS_TOKEN_ID,
            "pad_token_id": T.PAD_TOKEN_ID,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "depth": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "hidden_act": "silu",
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
            "out_hidden_size": 64,
            "tokens_per_second": 2,
        },
    }


def tiny_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**{k: v for k, v in tiny_config_dict().items() if k not in ("model_type", "architectures")})


def image_processor_config() -> dict:
    """`preprocessor_config.json` of the fixture, laid out like the real Qwen2.5-VL checkpoints'.

    `image_processor_type` names the torchvision class (as the hub files do); transformers 5 falls back to
    `Qwen2VLImageProcessorPil` without torchvision. min/max pixels are Qwen's own: 392 and 672 (multiples
    of 28) pass through smart_resize unchanged.
    """
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 16384,
        "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
    }


def build_model(seed: int = 0):
    """The tiny model in eval mode with deterministic, perturbed weights (see fixtures.checkpoint.perturb_)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlmforge.fixtures.checkpoint import perturb_

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config())
    return perturb_(model, seed).eval()


def write_fixture(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny Qwen2.5-VL checkpoint folder (weights, tokenizer, processor/generation configs)."""
    from vlmforge.fixtures.checkpoint import write_hf_folder
    from vlmforge.fixtures.tokenizer import build_tokenizer

    return write_hf_folder(build_model(seed), build_tokenizer(), image_processor_config(), Path(out_dir))


def trained_config_dict() -> dict:
    """The config of the trained fixture (`vlmforge.fixtures.train`): the tiny config with 56-px windows
    and rope_theta 10.

    Windows: the trained model sees 112-px images (8 x 8 patches), where 112-px windows would cover the
    whole image and the window path would be full attention in disguise; 56-px windows give 4 windows
    per image (one per cell of the task's 2 x 2 grid), so window blocks (0, 2) and full-attention blocks
    (1, 3) really differ. rope_theta: with head_dim 16, MRoPE gives each spatial axis 3 frequency pairs;
    at theta 1e6 the width axis turns < 2e-4 rad per position, the model cannot tell left from right and
    "the shape at the top left" was not learned. At theta 10 every axis turns 0.1-0.6 rad per position,
    so the trained model relies on correct 3-D positions and an export that gets them wrong loses accuracy.
    """
    cfg = tiny_config_dict()
    cfg["vision_config"] = {**cfg["vision_config"], "window_size": 56}
    cfg["text_config"] = {
        **cfg["text_config"],
        "rope_parameters": {**cfg["text_config"]["rope_parameters"], "rope_theta": 10.0},
    }
    return cfg


# Qwen2.5-VL-3B's public layer widths (field notes §12), for `vlmforge.bench`'s mid-size model.
BENCH_TEXT = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
              "num_key_value_heads": 2, "max_position_embeddings": 128000, "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}}
BENCH_VISION = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
                "window_size": 112, "hidden_act": "silu"}


def write_bench_checkpoint(out_dir: Path, layers: int, vision_depth: int) -> Path:
    """A random-weight checkpoint at Qwen2.5-VL-3B widths with `layers` decoder layers and `vision_depth` ViT
    blocks (the last one full attention), the fixture tokenizer: real per-layer costs in a few GB."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmforge.fixtures.checkpoint import perturb_, write_hf_folder
    from vlmforge.fixtures.tokenizer import build_tokenizer

    d = tiny_config_dict()
    d["tie_word_embeddings"] = True
    d["text_config"].update(BENCH_TEXT, num_hidden_layers=layers)
    d["vision_config"].update(BENCH_VISION, depth=vision_depth, fullatt_block_indexes=[vision_depth - 1])
    config = Qwen2_5_VLConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    model = perturb_(Qwen2_5_VLForConditionalGeneration(config), seed=0).eval()
    return write_hf_folder(model, build_tokenizer(), image_processor_config(), Path(out_dir))
