"""Qwen2.5-VL decoder stage: inputs_embeds + 3-D MRoPE position_ids + flat KV cache -> logits, presents."""

from __future__ import annotations

from pathlib import Path

from vlmforge.core.contracts import StageContract
from vlmforge.exporters import decoder as D


def decoder_contract(hf_config, options=None) -> StageContract:
    return D.decoder_contract(hf_config.text_config)


def build_decoder_module(hf_model) -> D.DecoderForExport:
    return D.DecoderForExport(hf_model.model.language_model, hf_model.lm_head)


def export_decoder(hf_model, options, out_path: Path) -> StageContract:
    from vlmforge.exporters.layered_decoder import layered_model
    from vlmforge.exporters.onnx_export import export_module

    tc = hf_model.config.text_config
    contract = decoder_contract(hf_model.config)
    with D.grouped_attention_on(tc):
        export_module(
            build_decoder_module(hf_model),
            D.example_inputs(tc),
            out_path,
            input_names=contract.input_names,
            output_names=contract.output_names,
            dynamic_shapes=D.dynamic_shapes(tc),
            stage="qwen2_5_vl/decoder",
            contract=contract,
            trace=layered_model,
        )
    return contract
