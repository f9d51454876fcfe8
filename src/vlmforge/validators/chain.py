"""The whole chain (vision -> embedding -> decoder, vlmforge's own loop and preprocessing) against HF
`generate`, token by token. Gates on logits as well as tokens: random tiny models have flat logits,
where greedy agreement alone is a weak signal (field notes §2)."""

from __future__ import annotations

import numpy as np

from vlmforge.runtime.engine import Engine
from vlmforge.host.tokens import eos_ids
from vlmforge.runtime.loop import PromptInputs, TokenIds, generate_tokens, greedy
from vlmforge.validators.reference import Reference, grid_tokens
from vlmforge.validators.metrics import gate, metrics
from vlmforge.validators.results import CheckResult


def token_ids(ref: Reference) -> TokenIds:
    cfg = ref.config
    eos = eos_ids(ref.eos if ref.eos is not None else cfg.text_config.eos_token_id)
    return TokenIds(cfg.image_token_id, cfg.vision_start_token_id, eos, ref.params.merge_size)


def reference_chain(ref: Reference, prompt: str, images, n_tokens: int) -> dict:
    """HF generate for one prompt: its tokens and step logits [T, V] (the model's side of run_chain). The
    images go through HF's own processor as they are; each image's token count is HF's grid."""
    if images:
        hf_pix = [ref.hf_pixels(img) for img in images]
        import torch

        pv = torch.cat([p for p, _ in hf_pix], 0)
        grids = torch.cat([g for _, g in hf_pix], 0)
        tokens = grid_tokens(grids.numpy(), ref.params.merge_size)
    else:
        pv = grids = tokens = None
    ids = np.asarray(ref.prompt_ids(prompt, len(images), tokens), np.int64)
    hf_tokens, hf_logits = ref.generate(ids.reshape(1, -1), pv, grids, n_tokens)
    return {"prompt": prompt, "n_images": len(images), "tokens": hf_tokens, "logits": hf_logits}


def run_chain(engine: Engine, ref: Reference, want: dict, images, n_tokens: int):
    """(ours tokens, ours logits [T, V], HF tokens, HF logits [T, V]) for one prompt; the HF side from
    `want` (reference_chain), computed before the model was freed."""
    ours_imgs = tuple(ref.params.patches(img) for img in images)  # vlmforge's own preprocessing
    ours_tokens = [int(ref.params.image_tokens(img)) for img in images]
    ids = np.asarray(ref.prompt_ids(want["prompt"], len(images), ours_tokens), np.int64)
    ours = list(generate_tokens(engine, PromptInputs(ids, ours_imgs), token_ids(ref), max_new_tokens=n_tokens,
                                min_new_tokens=n_tokens, choose=greedy))
    return [t for t, _ in ours], np.stack([lg for _, lg in ours]), want["tokens"], want["logits"]


def token_agreement(tokens, hf_tokens, hf_logits, near_tie: float | None,
                    near_tie_rel: float | None = None) -> tuple[dict, str]:
    """token_match: the share of the HF tokens reproduced before the first divergence (1.0 = identical).

    With `near_tie` (FP16/INT4 recipes), a divergence at a step where HF's own logit gap between its token
    and ours is below `near_tie` is a tie-break, not an error: both are greedy-optimal within the
    precision's logit error, and the streams cannot be compared after it. It counts as agreement and the
    detail says so. FP32 recipes set `near_tie_rel` instead: the gap must be below that fraction of the
    step's largest |logit|, the FP32 rounding bound the logits gate uses (max_rel). Measured on a random
    full-depth Qwen2.5-VL-3B: HF's top two logits 8.6e-6 apart at step 7 of a text prompt (|logits| ~1-10),
    where two correct FP32 implementations may pick either; on any real divergence the gap is far larger.
    """
    n = len(hf_tokens)
    first = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), None)
    if first is None and len(tokens) == n:
        return {"token_match": 1.0, "raw_token_match": 1.0}, f"all {n} identical"
    first = first if first is not None else min(len(tokens), n)
    raw = first / max(n, 1)
    if first < min(len(tokens), n):
        gap = float(hf_logits[first][hf_tokens[first]] - hf_logits[first][tokens[first]])
        bound = near_tie if near_tie is not None else (
            near_tie_rel * float(np.max(np.abs(hf_logits[first]))) if near_tie_rel is not None else None)
        if bound is not None and gap < bound:
            how = f"{near_tie}" if near_tie is not None else f"{near_tie_rel} x max|logit| = {bound:.3g}"
            return ({"token_match": 1.0, "raw_token_match": raw},
                    f"{first} identical, then a near-tie at step {first}: HF gap {gap:.3g} < {how}")
        return {"token_match": raw, "raw_token_match": raw}, f"first divergence at step {first}, HF gap {gap:.3g}"
    return {"token_match": raw, "raw_token_match": raw}, f"length differs after {first}"


def check_chain(engine: Engine, ref: Reference, cases, wants: list[dict], n_tokens: int, tol: dict) -> list[CheckResult]:
    """`cases`: (name, prompt, images); `wants`: reference_chain of each case, in the same order."""
    out = []
    for (name, prompt, images), want in zip(cases, wants, strict=True):
        tokens, logits, hf_tokens, hf_logits = run_chain(engine, ref, want, images, n_tokens)
        first = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), None)
        token_tol = {k: v for k, v in tol.items() if k == "token_match"}
        values, where = token_agreement(tokens, hf_tokens, hf_logits, tol.get("near_tie"), tol.get("near_tie_rel"))
        if token_tol:
            out += gate("chain", f"{name}: greedy tokens vs HF generate ({where})", values, token_tol)
        # Logits are compared while the two token streams agree (after a divergence the inputs differ);
        # step 0 always has identical inputs.
        upto = max(first if first is not None else len(hf_tokens), 1)
        logit_tol = {k: v for k, v in tol.items() if k not in ("token_match", "near_tie", "near_tie_rel")}
        checks = gate("chain", f"{name}: step logits vs HF generate ({upto} steps)",
                      metrics(logits[:upto], hf_logits[:upto], logits=True), logit_tol)
        out += [c.__class__(**{**c.__dict__, "detail": f"{c.detail}; tokens: {where}"}) for c in checks]
    return out
