"""Qwen2.5-VL: windowed ViT (patch 14, merge 2), MRoPE decoder with GQA.

Every fact vlmforge knows about the family is in FAMILY; nothing outside this folder names it.
"""

from __future__ import annotations

from vlmforge.families.qwen2_5_vl import decoder, dims, embedding, fixture, public, vision, vision_dynamic
from vlmforge.families.spec import FamilySpec, ImageDefaults, StageSpec, TrainedSpec

FAMILY = FamilySpec(
    key="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    hf_class="Qwen2_5_VLForConditionalGeneration",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    patch_multiple=28,
    default_sizes=(392, 672),
    check_image_size=dims.check_image_size,
    check_checkpoint_config=dims.check_checkpoint_config,
    deepstack_layers=dims.deepstack_layer_count,
    write_fixture=fixture.write_fixture,
    fixture_name="tiny-qwen2_5_vl",
    reference_vision=vision.reference_vision,
    # Both families preprocess with the Qwen2-VL processor; Qwen2.5-VL's defaults are CLIP's mean/std.
    image=ImageDefaults("Qwen2VLImageProcessorPil", (0.48145466, 0.4578275, 0.40821073),
                        (0.26862954, 0.26130258, 0.27577711)),
    genai_type="qwen2_5_vl",
    trained=TrainedSpec(112, fixture.trained_config_dict, fixture.image_processor_config),
    write_bench_checkpoint=fixture.write_bench_checkpoint,
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
