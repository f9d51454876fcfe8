"""The whole chain (vision -> embedding -> decoder, vlmforge's own loop and preprocessing) against HF
`generate`, token by token. Gates on logits as well as tokens: random tiny models have flat logits,
where greedy agreement alone is a weak signal (field notes §2)."""

from __future__ import annotations

import numpy as np

from vlmforge.runtime.engine import Engine
from vlmforge.runtime.loop import PromptInputs, TokenIds, generate_tokens, greedy
from vlmforge.validators.reference import Reference
from vlmforge.validators.results import CheckResult, at_least, at_most


def token_ids(ref: Reference) -> TokenIds:
    cfg = ref.config
    eos = ref.model.generation_config.eos_token_id
    if eos is None:
        eos = cfg.text_config.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return TokenIds(cfg.image_token_id, cfg.vision_start_token_id, eos, ref.params.merge_size, ref.family_key)


def run_chain(engine: Engine, ref: Reference, prompt: str, images, n_tokens: int):
    """(ours tokens, ours logits [T, V], HF tokens, HF logits [T, V]) for one prompt."""
    ids = np.asarray(ref.prompt_ids(prompt, len(images)), np.int64)
    ours_imgs = tuple(ref.params.patches(img) for img in images)
    ours = list(generate_tokens(engine, PromptInputs(ids, ours_imgs), token_ids(ref), max_new_tokens=n_tokens,
                                min_new_tokens=n_tokens, choose=greedy))
    if images:
        hf_pix = [ref.hf_pixels(img) for img in images]
        import torch

        pv = torch.cat([p for p, _ in hf_pix], 0)
        grids = torch.cat([g for _, g in hf_pix], 0)
    else:
        pv = grids = None
    hf_tokens, hf_logits = ref.generate(ids.reshape(1, -1), pv, grids, n_tokens)
    return [t for t, _ in ours], np.stack([lg for _, lg in ours]), hf_tokens, hf_logits


def check_chain(engine: Engine, ref: Reference, cases, n_tokens: int, tol: dict) -> list[CheckResult]:
    out = []
    for name, prompt, images in cases:
        tokens, logits, hf_tokens, hf_logits = run_chain(engine, ref, prompt, images, n_tokens)
        same = sum(int(a == b) for a, b in zip(tokens, hf_tokens))
        frac = same / max(len(hf_tokens), 1) if len(tokens) == len(hf_tokens) else 0.0
        first = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), None)
        detail = f"{len(hf_tokens)} tokens" + (f"; first divergence at step {first}" if first is not None else "")
        out.append(at_least("chain", f"{name}: greedy tokens == HF generate", "token_match", frac,
                            tol["token_match"], detail))
        # Logits compared while the two token streams agree (after a divergence the inputs differ).
        upto = first if first is not None else len(hf_tokens)
        diff = float(np.max(np.abs(logits[:upto] - hf_logits[:upto]))) if upto else float("inf")
        out.append(at_most("chain", f"{name}: step logits vs HF generate", "logits max_abs", diff,
                           tol["logits_max_abs"], f"over {upto} steps"))
    return out
