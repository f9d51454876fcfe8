"""Qwen3-VL embedding stage: image features injected at `<|image_pad|>`, plus DeepStack features laid out
densely as `deepstack_embeds [L, B, S, H]` (zeros at text positions) for the decoder."""

from __future__ import annotations

from pathlib import Path

from vlmforge.core.contracts import StageContract
from vlmforge.exporters import embedding as E


def _layers(hf_config, options) -> int:
    return len(hf_config.vision_config.deepstack_visual_indexes) if options is None or options.deepstack else 0


def embedding_contract(hf_config, options=None) -> StageContract:
    return E.embedding_contract(hf_config.text_config.hidden_size, _layers(hf_config, options))


def export_embedding(hf_model, options, out_path: Path) -> StageContract:
    from vlmforge.exporters.onnx_export import export_module

    layers = _layers(hf_model.config, options)
    module = E.EmbeddingForExport(hf_model.model.language_model.embed_tokens, hf_model.config.image_token_id, layers)
    contract = embedding_contract(hf_model.config, options)
    export_module(
        module,
        E.example_inputs(module, hf_model.config.text_config.hidden_size),
        out_path,
        input_names=contract.input_names,
        output_names=contract.output_names,
        dynamic_shapes=E.dynamic_shapes(layers),
        stage="qwen3_vl/embedding",
        contract=contract,
    )
    return contract
