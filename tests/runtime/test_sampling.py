"""Sampling vs the logits processors HF `generate` builds for the same settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlmforge.core.errors import InputError
from vlmforge.families.qwen2_5_vl.fixture import tiny_config
from vlmforge.runtime.sampling import process_logits, sample_next

VOCAB = 512


@pytest.fixture(scope="module")
def generate_processors():
    """`generate`'s own processor list for given settings (order and padding handling included)."""
    model = Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()

    def build(mask: np.ndarray, **settings) -> LogitsProcessorList:
        do_sample = settings.get("temperature", 1.0) != 0
        if not do_sample:
            settings = {"repetition_penalty": settings.get("repetition_penalty", 1.0)}
        config = GenerationConfig(do_sample=do_sample, **settings)
        return model._get_logits_processor(
            config, input_ids_seq_length=mask.shape[1], model_kwargs={"attention_mask": torch.tensor(mask)}
        )

    return build


def batch(seed: int, rows: int = 3, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, VOCAB)) * scale).astype(np.float32)
    lengths = rng.integers(5, 20, rows)
    width = int(lengths.max())
    ids = np.full((rows, width), 500, dtype=np.int64)  # left padding: generate must not penalize token 500 for it
    mask = np.zeros((rows, width), dtype=np.int64)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = rng.integers(0, VOCAB, n)
        mask[r, width - n :] = 1
    unpadded = [ids[r, width - n :] for r, n in enumerate(lengths)]
    return logits, ids, mask, unpadded


SETTINGS = [
    dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3),
    dict(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0),
    dict(temperature=1.5, top_k=5, top_p=1.0, repetition_penalty=0.8),
    dict(temperature=0.3, top_k=0, top_p=0.95, repetition_penalty=1.2),
    dict(temperature=1.0, top_k=20, top_p=0.3, repetition_penalty=1.1),
    dict(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.5),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processed_logits_match_hf_generate_processors(generate_processors, settings, seed):
    logits, ids, mask, unpadded = batch(seed)
    processors = generate_processors(mask, **settings)
    ref = processors(torch.tensor(ids), torch.tensor(logits)).numpy()
    ours = process_logits(logits, generated_ids=unpadded, **settings)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))  # same surviving tokens
    kept = np.isfinite(ref)
    assert kept.sum(axis=-1).min() >= 1
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=0, atol=1e-6)


def test_penalty_and_warpers_match_hf_classes_applied_in_order():
    logits, ids, mask, _ = batch(7)
    dense = np.where(mask == 1, ids, ids[:, -1:])  # padded [B, L] ids: no padding token to ignore
    chain = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.25), TemperatureLogitsWarper(0.8), TopKLogitsWarper(30), TopPLogitsWarper(0.85)]
    )
    ref = chain(torch.tensor(dense), torch.tensor(logits)).numpy()
    ours = process_logits(logits, temperature=0.8, top_k=30, top_p=0.85, repetition_penalty=1.25, generated_ids=dense)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=0, atol=1e-6)


def test_greedy_is_argmax():
    logits, *_ = batch(3, rows=8)
    np.testing.assert_array_equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert sample_next(logits, temperature=0).dtype == np.int64


def test_greedy_with_penalty_matches_hf_greedy(generate_processors):
    logits, ids, mask, unpadded = batch(4, rows=6, scale=0.5)
    ref = generate_processors(mask, temperature=0, repetition_penalty=2.0)(torch.tensor(ids), torch.tensor(logits))
    got = sample_next(logits, temperature=0, repetition_penalty=2.0, generated_ids=unpadded)
    np.testing.assert_array_equal(got, ref.argmax(-1).numpy())


def test_top_k_1_is_greedy():
    logits, *_ = batch(5, rows=16)
    for seed in range(5):
        got = sample_next(logits, temperature=1.3, top_k=1, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(got, logits.argmax(-1))


def test_sampling_is_reproducible_with_a_seed():
    logits, *_ = batch(6, rows=32, scale=0.5)
    kwargs = dict(temperature=1.0, top_k=100, top_p=0.95)
    first = sample_next(logits, rng=np.random.default_rng(123), **kwargs)
    again = sample_next(logits, rng=np.random.default_rng(123), **kwargs)
    other = sample_next(logits, rng=np.random.default_rng(124), **kwargs)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_draws_follow_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32)).repeat(40000, axis=0)
    draws = sample_next(logits, temperature=1.0, top_p=0.8, rng=np.random.default_rng(0))
    # top_p=0.8 keeps {0.5, 0.3} (HF drops tokens whose ascending cumulative mass <= 0.2): renormalized 5/8, 3/8
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq[2] == freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.01)


@pytest.mark.parametrize(
    ("kwargs", "name", "valid"),
    [
        (dict(temperature=-0.1), "temperature", "temperature >= 0"),
        (dict(top_p=0.0), "top_p", "(0, 1]"),
        (dict(top_p=1.5), "top_p", "(0, 1]"),
        (dict(top_k=-1), "top_k", "top_k >= 0"),
        (dict(top_k=2.5), "top_k", "integer"),
        (dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
    ],
)
def test_invalid_arguments_name_argument_and_range(kwargs, name, valid):
    logits, *_ = batch(0, rows=1)
    with pytest.raises(InputError, match=name) as err:
        sample_next(logits, rng=np.random.default_rng(0), **kwargs)
    assert valid in str(err.value)


def test_sampling_without_rng_is_an_input_error():
    logits, *_ = batch(0, rows=1)
    with pytest.raises(InputError, match="random generator"):
        sample_next(logits, temperature=1.0)
