"""Token embedding with vision-feature injection, family-agnostic.

Formulation (field notes §5): a zero row is put in front of the features and `cumsum(mask) * mask`
indexes into them (text positions take row 0), then `Where`. It matches HF's `masked_scatter` exactly, keeps every shape dynamic (B, S, N, N = 0 on
decode steps) and ran 5-20x faster in onnxruntime than scatter forms.
"""

from __future__ import annotations

import torch

from vlmforge.core.contracts import StageContract, TensorSpec


class EmbeddingForExport(torch.nn.Module):
    def __init__(self, embed_tokens: torch.nn.Embedding, image_token_id: int, deepstack_layers: int = 0) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = int(image_token_id)
        self.deepstack_layers = int(deepstack_layers)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor, *deepstack: torch.Tensor):
        b, s = input_ids.shape[0], input_ids.shape[1]
        text = self.embed_tokens(input_ids)
        hidden = text.shape[-1]
        is_image = (input_ids == self.image_token_id).reshape(-1).to(torch.int64)
        rank = torch.cumsum(is_image, dim=0) * is_image  # k-th image token (row-major over the batch) -> row k
        # Only image tokens that have a feature row are replaced: an `<|image_pad|>` the model generates on a
        # decode step (N = 0) keeps its token embedding, as in HF, instead of indexing past the features.
        n = torch.ones_like(image_features[:, 0], dtype=torch.int64).sum()
        valid = (rank > 0) & (rank <= n)
        index = torch.where(valid, rank, torch.zeros_like(rank))
        mask = valid.reshape(b, s)
        zero = torch.zeros((1, hidden), dtype=text.dtype)
        feats = torch.cat([zero, image_features.to(text.dtype)], dim=0)
        injected = feats[index].reshape(b, s, hidden)
        inputs_embeds = torch.where(mask.unsqueeze(-1), injected, text)
        if not self.deepstack_layers:
            return inputs_embeds
        ds = deepstack[0].to(text.dtype)  # [L, N, H]
        ds = torch.cat([torch.zeros((ds.shape[0], 1, hidden), dtype=ds.dtype), ds], dim=1)
        deepstack_embeds = ds[:, index, :].reshape(ds.shape[0], b, s, hidden)  # zeros at text positions
        return inputs_embeds, deepstack_embeds


def embedding_contract(hidden: int, deepstack_layers: int = 0, dtype: str = "float32") -> StageContract:
    inputs = [
        TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),
        TensorSpec("image_features", dtype, ("num_image_tokens", hidden)),
    ]
    outputs = [TensorSpec("inputs_embeds", dtype, ("batch_size", "sequence_length", hidden))]
    if deepstack_layers:
        inputs.append(TensorSpec("deepstack_features", dtype, (deepstack_layers, "num_image_tokens", hidden)))
        outputs.append(
            TensorSpec("deepstack_embeds", dtype, (deepstack_layers, "batch_size", "sequence_length", hidden))
        )
    return StageContract("embedding", tuple(inputs), tuple(outputs), {"deepstack_layers": deepstack_layers})


def example_inputs(module: EmbeddingForExport, hidden: int) -> tuple[torch.Tensor, ...]:
    """B=2, S=7, N=3: sizes that avoid 0/1 specialisation in the exported graph."""
    ids = torch.tensor([[1, 2, module.image_token_id, module.image_token_id, 3, 4, 5],
                        [6, module.image_token_id, 7, 8, 9, 10, 11]], dtype=torch.int64)
    args: tuple[torch.Tensor, ...] = (ids, torch.randn(3, hidden))
    if module.deepstack_layers:
        args += (torch.randn(module.deepstack_layers, 3, hidden),)
    return args


def dynamic_shapes(deepstack_layers: int) -> tuple:
    b, s, n = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length"), torch.export.Dim("num_image_tokens")
    # forward(*deepstack) takes the varargs as one tuple, which is absent when there is no DeepStack.
    return ({0: b, 1: s}, {0: n}, ({1: n},)) if deepstack_layers else ({0: b, 1: s}, {0: n})
