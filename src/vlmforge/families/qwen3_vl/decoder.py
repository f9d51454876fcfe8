"""Qwen3-VL decoder stage: the Qwen2.5-VL decoder contract plus `deepstack_embeds [L, B, S, H]`, added to
the hidden states after decoder layer i for i < L, exactly where HF adds them (zeros on decode steps)."""

from __future__ import annotations

from pathlib import Path

from vlmforge.core.contracts import StageContract
from vlmforge.exporters import decoder as D
from vlmforge.families.qwen3_vl.embedding import _layers


def decoder_contract(hf_config, options=None) -> StageContract:
    return D.decoder_contract(hf_config.text_config, _layers(hf_config, options))


def export_decoder(hf_model, options, out_path: Path) -> StageContract:
    from vlmforge.exporters.layered_decoder import layered_model
    from vlmforge.exporters.onnx_export import export_module

    tc = hf_model.config.text_config
    layers = _layers(hf_model.config, options)
    contract = decoder_contract(hf_model.config, options)
    with D.grouped_attention_on(tc):
        export_module(
            D.DecoderForExport(hf_model.model.language_model, hf_model.lm_head, layers),
            D.example_inputs(tc, layers),
            out_path,
            input_names=contract.input_names,
            output_names=contract.output_names,
            dynamic_shapes=D.dynamic_shapes(tc, layers),
            stage="qwen3_vl/decoder",
            contract=contract,
            trace=layered_model,
        )
    return contract
