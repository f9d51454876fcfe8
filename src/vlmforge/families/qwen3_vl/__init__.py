"""Qwen3-VL: ViT with interpolated learned position embedding and DeepStack, interleaved-MRoPE decoder.

Every fact vlmforge knows about the family is in FAMILY; nothing outside this folder names it.
"""

from __future__ import annotations

from vlmforge.families.qwen3_vl import decoder, deepstack, dims, embedding, fixture, public, vision, vision_dynamic
from vlmforge.families.spec import FamilySpec, ImageDefaults, StageSpec, TrainedSpec

FAMILY = FamilySpec(
    key="qwen3_vl",
    display_name="Qwen3-VL",
    hf_class="Qwen3VLForConditionalGeneration",
    architectures=("Qwen3VLForConditionalGeneration",),
    patch_multiple=32,
    default_sizes=(384, 672),
    check_image_size=dims.check_image_size,
    check_checkpoint_config=dims.check_checkpoint_config,
    deepstack_layers=dims.deepstack_layer_count,
    write_fixture=fixture.write_fixture,
    fixture_name="tiny-qwen3_vl",
    reference_vision=vision.reference_vision,
    image=ImageDefaults("Qwen2VLImageProcessorPil", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    genai_type="qwen3_vl",
    trained=TrainedSpec(128, fixture.trained_config_dict, fixture.image_processor_config),
    deepstack_off=deepstack.deepstack_disabled,
    stages={
        "vision": StageSpec("vision", vision.stage_contract, vision.stage_export),
        "embedding": StageSpec("embedding", embedding.embedding_contract, embedding.export_embedding),
        "decoder": StageSpec("decoder", decoder.decoder_contract, decoder.export_decoder),
    },
    dynamic_vision=StageSpec("vision", vision_dynamic.stage_contract, vision_dynamic.stage_export),
    stage_weights={
        "vision": ("model.visual.",),
        "embedding": ("model.language_model.embed_tokens.",),
        "decoder": ("model.language_model.layers.", "model.language_model.norm.", "lm_head."),
    },
    checkpoint_name=public.hub_tensor_name,
)
