"""Next-token selection in numpy, following HF generate's logits processors in HF's order.

`RepetitionPenaltyLogitsProcessor` (processor, applied for greedy too) -> `TemperatureLogitsWarper` ->
`TopKLogitsWarper` -> `TopPLogitsWarper` -> softmax -> draw. Filtered logits are -inf, as in HF.
Temperature 0 means greedy (argmax of the penalized logits), which HF spells ``do_sample=False``.
The random draw itself cannot reproduce torch.multinomial's stream; it is reproducible for a given
`np.random.Generator` state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmforge.core.errors import InputError

__all__ = ["apply_repetition_penalty", "process_logits", "sample_next", "top_k_filter", "top_p_filter"]

_WHERE = "vlmforge.runtime.sampling"


def sample_next(
    logits,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generated_ids=None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Next token per row of `logits` ``[B, V]`` -> ``[B]`` int64.

    `generated_ids`: the ids the repetition penalty applies to, per row — a ``[B, L]`` integer array or
    B sequences of different lengths (leave left padding out, as HF does via `prompt_ignore_length`).
    `top_k=0` and `top_p=1.0` disable those filters; `rng` is required unless `temperature == 0`.
    """
    scores = process_logits(
        logits,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        generated_ids=generated_ids,
    )
    if temperature == 0:
        return np.argmax(scores, axis=-1).astype(np.int64)
    if rng is None:
        raise InputError(
            "sampling (temperature > 0) needs a random generator",
            where=f"{_WHERE}.sample_next",
            fix="pass rng=np.random.default_rng(seed), or temperature=0 for greedy decoding",
        )
    probs = _softmax64(scores)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    picked = (cdf <= draws).sum(axis=-1)  # first index whose cdf exceeds the draw: never a 0-probability one
    last_kept = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)  # guards draw ~= total rounding
    return np.minimum(picked, last_kept).astype(np.int64)


def process_logits(
    logits,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generated_ids=None,
) -> np.ndarray:
    """The logits HF would sample from (filtered ones at -inf); with temperature 0 only the penalty applies."""
    _validate(temperature, top_k, top_p, repetition_penalty)
    scores = np.array(logits, dtype=np.float32, copy=True)
    if scores.ndim != 2:
        raise InputError(
            f"logits must be [batch, vocab], got shape {scores.shape}",
            where=f"{_WHERE}.sample_next",
            fix="pass the last position's logits, e.g. logits[:, -1, :]",
        )
    if repetition_penalty != 1.0 and generated_ids is not None:  # None: nothing generated yet to penalize
        scores = apply_repetition_penalty(scores, generated_ids, repetition_penalty)
    if temperature == 0:
        return scores
    if temperature != 1.0:
        scores = scores / np.float32(temperature)
    if top_k:
        scores = top_k_filter(scores, top_k)
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    return scores


def apply_repetition_penalty(scores: np.ndarray, generated_ids, penalty: float) -> np.ndarray:
    """HF `RepetitionPenaltyLogitsProcessor`: each seen token once, ``s<0 ? s*p : s/p``; ids >= V ignored."""
    out = np.array(scores, dtype=np.float32, copy=True)
    rows = _rows(generated_ids, out.shape[0])
    vocab = out.shape[1]
    p = np.float32(penalty)
    for b, ids in enumerate(rows):
        seen = np.unique(ids[(ids >= 0) & (ids < vocab)])
        s = out[b, seen]
        out[b, seen] = np.where(s < 0, s * p, s / p)
    return out


def top_k_filter(scores: np.ndarray, top_k: int) -> np.ndarray:
    """HF `TopKLogitsWarper`: drop scores below the k-th largest (ties with it survive)."""
    k = min(top_k, scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k, None]
    return np.where(scores < kth, -np.inf, scores).astype(np.float32)


def top_p_filter(scores: np.ndarray, top_p: float) -> np.ndarray:
    """HF `TopPLogitsWarper`: ascending sort, drop tokens whose cumulative probability <= 1 - top_p.

    The most probable token always survives (min_tokens_to_keep=1). Arithmetic in float32 like HF's.
    """
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(_softmax32(sorted_scores), axis=-1, dtype=np.float32)
    remove_sorted = cumulative <= np.float32(1 - top_p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores).astype(np.float32)


def _validate(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    checks = (
        ("temperature", temperature, temperature >= 0, "temperature >= 0 (0 = greedy)"),
        ("top_k", top_k, isinstance(top_k, (int, np.integer)) and top_k >= 0, "an integer top_k >= 0 (0 = off)"),
        ("top_p", top_p, 0 < top_p <= 1, "top_p in (0, 1] (1 = off)"),
        ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "repetition_penalty > 0 (1 = off)"),
    )
    for name, value, ok, valid in checks:
        if not ok:  # NaN fails every comparison, so it lands here too
            raise InputError(
                f"{name}={value!r} is out of range",
                where=f"{_WHERE}.sample_next",
                fix=f"pass {valid}",
            )


def _rows(generated_ids, batch: int) -> list[np.ndarray]:
    if isinstance(generated_ids, np.ndarray) and generated_ids.ndim == 2:
        rows = list(generated_ids.astype(np.int64))
    elif isinstance(generated_ids, Sequence | np.ndarray):
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in generated_ids]
    else:
        rows = []
    if len(rows) != batch:
        raise InputError(
            f"generated_ids has {len(rows)} row(s) for {batch} row(s) of logits",
            where=f"{_WHERE}.sample_next",
            fix="pass one sequence of previous token ids per batch row",
        )
    return rows


def _softmax32(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True), dtype=np.float32)
    return e / e.sum(axis=-1, keepdims=True, dtype=np.float32)


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
