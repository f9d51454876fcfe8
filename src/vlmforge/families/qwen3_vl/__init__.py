"""Qwen3-VL: ViT with interpolated learned position embedding and DeepStack, interleaved-MRoPE decoder."""

from __future__ import annotations

from vlmforge.registry import FamilySpec, StageSpec, lazy, register_family

_P = "vlmforge.families.qwen3_vl"

FAMILY = register_family(
    FamilySpec(
        key="qwen3_vl",
        display_name="Qwen3-VL",
        hf_class="Qwen3VLForConditionalGeneration",
        architectures=("Qwen3VLForConditionalGeneration",),
        patch_multiple=32,
        default_sizes=(384, 672),
        check_image_size=lazy(f"{_P}.dims:check_image_size"),
        check_checkpoint_config=lambda hf_config, where: lazy(f"{_P}.dims:check_deepstack_indexes")(
            hf_config.vision_config, where
        ),
        deepstack_layers=lambda hf_config: len(hf_config.vision_config.deepstack_visual_indexes),
        write_fixture=lazy(f"{_P}.fixture:write_fixture"),
        fixture_name="tiny-qwen3_vl",
        stages={
            "vision": StageSpec(
                "vision",
                lambda hf_config, o: lazy(f"{_P}.vision:vision_contract")(hf_config, o.image_size, o.deepstack),
                lambda hf_model, o, path: lazy(f"{_P}.vision:export_vision")(hf_model, o.image_size, path, o.deepstack),
            ),
            "embedding": StageSpec(
                "embedding", lazy(f"{_P}.embedding:embedding_contract"), lazy(f"{_P}.embedding:export_embedding")
            ),
            "decoder": StageSpec("decoder", lazy(f"{_P}.decoder:decoder_contract"), lazy(f"{_P}.decoder:export_decoder")),
        },
        genai_type="qwen3_vl",
        deepstack_off=lazy(f"{_P}.deepstack:deepstack_disabled"),
    )
)
