"""The embedding and decoder exporters on tiny torch modules, exported with export_module and run in
onnxruntime at other sizes than the example inputs (the dims really are dynamic), against torch.

The decoder wraps a toy language model with the interface DecoderForExport composes (layers taking the
additive mask, rotary embeddings and the cache; rotary_emb; norm): one prefill of 7 tokens must equal a
prefill of 4 and a step of 3 over the returned cache, which fails if the causal mask or the flat cache
were wrong."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vlmforge.exporters import decoder as D
from vlmforge.exporters import embedding as E
from vlmforge.exporters.onnx_export import export_module

HIDDEN, VOCAB, IMAGE = 8, 20, 5


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# -- embedding ----------------------------------------------------------------------------------------
def _masked_scatter(table: torch.nn.Embedding, ids: torch.Tensor, feats: torch.Tensor) -> np.ndarray:
    """HF's formulation: image-token positions take the feature rows in order (row-major over the batch)."""
    out = table(ids).clone()
    mask = (ids == IMAGE).unsqueeze(-1).expand_as(out)
    return out.masked_scatter(mask, feats).detach().numpy()


@pytest.fixture(scope="module")
def embedding_graph(tmp_path_factory):
    torch.manual_seed(0)
    module = E.EmbeddingForExport(torch.nn.Embedding(VOCAB, HIDDEN), IMAGE)
    path = tmp_path_factory.mktemp("embedding") / "embedding.onnx"
    contract = E.embedding_contract(HIDDEN)
    export_module(module, E.example_inputs(module, HIDDEN), path, input_names=contract.input_names,
                  output_names=contract.output_names, dynamic_shapes=E.dynamic_shapes(0), stage="embedding",
                  contract=contract)
    return module, path


def test_embedding_graph_injects_features_like_masked_scatter(embedding_graph):
    module, path = embedding_graph
    ids = torch.tensor([[IMAGE, 1, 2, IMAGE, IMAGE], [3, 4, IMAGE, 6, 7], [8, 9, 10, 11, 12]])
    feats = torch.randn(4, HIDDEN)
    (got,) = _session(path).run(None, {"input_ids": ids.numpy(), "image_features": feats.numpy()})
    want = _masked_scatter(module.embed_tokens, ids, feats)
    assert got.shape == (3, 5, HIDDEN)
    assert np.array_equal(got, want)  # a copy of rows: exact
    assert np.array_equal(got, module(ids, feats).detach().numpy())


def test_embedding_graph_keeps_text_embeddings_when_there_are_no_features(embedding_graph):
    """A decode step (N = 0) that generated an image token keeps its token embedding, as HF does."""
    module, path = embedding_graph
    ids = torch.tensor([[IMAGE], [4]])
    (got,) = _session(path).run(None, {"input_ids": ids.numpy(), "image_features": np.zeros((0, HIDDEN), np.float32)})
    assert np.array_equal(got, module.embed_tokens(ids).detach().numpy())


# -- decoder ------------------------------------------------------------------------------------------
class _Layer(torch.nn.Module):
    def __init__(self, idx: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.idx, self.heads, self.kv_heads, self.head_dim = idx, heads, kv_heads, head_dim
        self.q = torch.nn.Linear(HIDDEN, heads * head_dim)
        self.k = torch.nn.Linear(HIDDEN, kv_heads * head_dim)
        self.v = torch.nn.Linear(HIDDEN, kv_heads * head_dim)
        self.o = torch.nn.Linear(heads * head_dim, HIDDEN)

    def forward(self, hidden, attention_mask, position_embeddings, past_key_values, use_cache):
        b, s, _ = hidden.shape
        cos, sin = position_embeddings  # [B, S, D]
        q = self.q(hidden).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(hidden).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(hidden).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos.unsqueeze(1) + sin.unsqueeze(1), k * cos.unsqueeze(1) + sin.unsqueeze(1)
        k, v = past_key_values.update(k, v, self.idx)
        out, _ = D.grouped_attention(self, q, k, v, attention_mask, self.head_dim ** -0.5)
        return hidden + self.o(out.reshape(b, s, -1))


class _Rotary(torch.nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(head_dim, dtype=torch.float32) / head_dim))

    def forward(self, hidden, position_ids):  # position_ids [3, B, S]: the text rows are all equal
        angles = position_ids[0].to(torch.float32).unsqueeze(-1) * self.inv_freq
        return torch.cos(angles), torch.sin(angles) * 0.1


class _ToyLM(torch.nn.Module):
    def __init__(self, layers: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(i, heads, kv_heads, head_dim) for i in range(layers))
        self.rotary_emb = _Rotary(head_dim)
        self.norm = torch.nn.LayerNorm(HIDDEN)


CFG = SimpleNamespace(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=4, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def decoder_graph(tmp_path_factory):
    torch.manual_seed(1)
    module = D.DecoderForExport(_ToyLM(2, 4, 2, 4), torch.nn.Linear(HIDDEN, VOCAB, bias=False)).eval()
    contract = D.decoder_contract(CFG)
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    export_module(module, D.example_inputs(CFG), path, input_names=contract.input_names,
                  output_names=contract.output_names, dynamic_shapes=D.dynamic_shapes(CFG), stage="decoder",
                  contract=contract)
    return module, path, contract


def _feeds(contract, embeds, mask, positions, past):
    arrays = [embeds, mask, positions, *past]
    return {name: np.ascontiguousarray(a) for name, a in zip(contract.input_names, arrays)}


def _positions(start: int, s: int, b: int = 1) -> np.ndarray:
    return np.broadcast_to(np.arange(start, start + s, dtype=np.int64), (3, b, s)).copy()


def test_decoder_graph_matches_torch_and_its_cache_continues_the_prefill(decoder_graph):
    module, path, contract = decoder_graph
    sess = _session(path)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 7, HIDDEN)).astype(np.float32)
    empty = [np.zeros((1, 2, 0, 4), np.float32)] * 4
    full = sess.run(None, _feeds(contract, embeds, np.ones((1, 7), np.int64), _positions(0, 7), empty))
    with torch.no_grad():
        ref = module(torch.from_numpy(embeds), torch.ones(1, 7, dtype=torch.int64), torch.from_numpy(_positions(0, 7)),
                     *map(torch.from_numpy, empty))
    assert np.allclose(full[0], ref[0].numpy(), atol=1e-5)
    assert [o.shape for o in full[1:]] == [(1, 2, 7, 4)] * 4  # present = past + new, per layer and kind
    head = sess.run(None, _feeds(contract, embeds[:, :4], np.ones((1, 4), np.int64), _positions(0, 4), empty))
    tail = sess.run(None, _feeds(contract, embeds[:, 4:], np.ones((1, 7), np.int64), _positions(4, 3), head[1:]))
    assert np.allclose(tail[0], full[0][:, 4:], atol=1e-5)  # causal: the later tokens see exactly the same keys
    assert np.allclose(head[0], full[0][:, :4], atol=1e-5)  # ... and the earlier ones none of the later
    for a, b in zip(tail[1:], full[1:]):
        assert np.allclose(a, b, atol=1e-5)


def test_decoder_graph_ignores_padded_keys(decoder_graph):
    """A left-padded row (mask 0 on the pad) gives the unpadded row's logits at the real positions."""
    _, path, contract = decoder_graph
    sess = _session(path)
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((1, 3, HIDDEN)).astype(np.float32)
    empty = [np.zeros((1, 2, 0, 4), np.float32)] * 4
    alone = sess.run(None, _feeds(contract, embeds, np.ones((1, 3), np.int64), _positions(0, 3), empty))[0]
    padded = np.concatenate([rng.standard_normal((1, 2, HIDDEN)).astype(np.float32), embeds], axis=1)
    positions = np.concatenate([np.zeros((3, 1, 2), np.int64), _positions(0, 3)], axis=2)
    got = sess.run(None, _feeds(contract, padded, np.array([[0, 0, 1, 1, 1]]), positions, empty))[0]
    assert np.allclose(got[:, 2:], alone, atol=1e-5)


def test_grouped_attention_equals_attention_with_repeated_kv_heads():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 6, 3, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    mask = D.causal_mask(torch.ones(2, 5, dtype=torch.int64), 3, torch.float32)
    got, _ = D.grouped_attention(None, q, k, v, mask, 0.5)
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)  # head h uses KV head h // 3
    want = (torch.softmax(q @ kr.transpose(-1, -2) * 0.5 + mask, dim=-1) @ vr).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-6)
    assert mask.shape == (2, 1, 3, 5) and bool((mask[0, 0, 0, 3:] < -1e30).all()) and bool((mask[0, 0, 2] == 0).all())
