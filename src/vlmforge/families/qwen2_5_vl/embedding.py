"""Qwen2.5-VL embedding stage: token embedding with image features injected at `<|image_pad|>`."""

from __future__ import annotations

from pathlib import Path

from vlmforge.core.contracts import StageContract
from vlmforge.exporters import embedding as E


def embedding_contract(hf_config, options=None) -> StageContract:
    return E.embedding_contract(hf_config.text_config.hidden_size)


def build_embedding_module(hf_model) -> E.EmbeddingForExport:
    return E.EmbeddingForExport(hf_model.model.language_model.embed_tokens, hf_model.config.image_token_id)


def export_embedding(hf_model, options, out_path: Path) -> StageContract:
    from vlmforge.exporters.onnx_export import export_module

    module = build_embedding_module(hf_model)
    contract = embedding_contract(hf_model.config)
    export_module(
        module,
        E.example_inputs(module, hf_model.config.text_config.hidden_size),
        out_path,
        input_names=contract.input_names,
        output_names=contract.output_names,
        dynamic_shapes=E.dynamic_shapes(0),
        stage="qwen2_5_vl/embedding",
        contract=contract,
    )
    return contract
