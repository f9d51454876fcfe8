"""Qwen2.5-VL: windowed ViT (patch 14, merge 2), MRoPE decoder with GQA."""

from __future__ import annotations

from vlmforge.registry import FamilySpec, StageSpec, lazy, register_family

_P = "vlmforge.families.qwen2_5_vl"

FAMILY = register_family(
    FamilySpec(
        key="qwen2_5_vl",
        display_name="Qwen2.5-VL",
        hf_class="Qwen2_5_VLForConditionalGeneration",
        architectures=("Qwen2_5_VLForConditionalGeneration",),
        patch_multiple=28,
        default_sizes=(392, 672),
        check_image_size=lazy(f"{_P}.dims:check_image_size"),
        check_checkpoint_config=lambda hf_config, where: None,
        deepstack_layers=lambda hf_config: 0,
        write_fixture=lazy(f"{_P}.fixture:write_fixture"),
        fixture_name="tiny-qwen2_5_vl",
        stages={
            "vision": StageSpec(
                "vision",
                lambda hf_config, o: lazy(f"{_P}.vision:vision_contract")(hf_config, o.image_size),
                lambda hf_model, o, path: lazy(f"{_P}.vision:export_vision")(hf_model, o.image_size, path),
            ),
            "embedding": StageSpec(
                "embedding", lazy(f"{_P}.embedding:embedding_contract"), lazy(f"{_P}.embedding:export_embedding")
            ),
            "decoder": StageSpec(
                "decoder", lazy(f"{_P}.decoder:decoder_contract"), lazy(f"{_P}.decoder:export_decoder")
            ),
        },
        genai_type="qwen2_5_vl",
    )
)
