"""Each graph alone against the PyTorch model, on real inputs (images through the image processor,
chat prompts through the chat template)."""

from __future__ import annotations

import numpy as np

from vlmforge.host import mrope
from vlmforge.host.tokens import left_pad, pad_id
from vlmforge.runtime.engine import Engine
from vlmforge.validators.reference import Reference
from vlmforge.validators.metrics import compare
from vlmforge.validators.results import CheckResult


def check_preprocess(ref: Reference, images, tol: dict) -> list[CheckResult]:
    """vlmforge's numpy preprocessing (what the runtime ships) vs HF's image processor."""
    out = []
    for i, img in enumerate(images):
        ours, grid = ref.params.patches(img)
        hf, hf_grid = ref.hf_pixels(img)
        same_grid = list(grid[0]) == hf_grid[0].tolist()
        out += compare("preprocess", f"pixel_values image {i}", ours if same_grid else ours[:0], hf.numpy(), tol)
    return out


def check_vision(engine: Engine, ref: Reference, images, tol: dict, deepstack: bool) -> list[CheckResult]:
    out = []
    for i, img in enumerate(images):
        pv, grid = ref.hf_pixels(img)
        feats, ds = engine.encode_image(pv.numpy(), grid.numpy())
        want, want_ds = ref.vision(pv, grid)
        out += compare("vision", f"image_features image {i}", feats, want, tol)
        if deepstack:
            out += compare("vision", f"deepstack_features image {i}", ds, want_ds, tol)
    return out


def _batch(ref: Reference, rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded batch (the padding side generation uses)."""
    return left_pad(rows, pad)


def check_embedding(engine: Engine, ref: Reference, image, tol: dict, deepstack: bool) -> list[CheckResult]:
    cfg = ref.config
    pad = pad_id(cfg.text_config.pad_token_id)
    pv, grid = ref.hf_pixels(image)
    feats, ds = ref.vision(pv, grid)
    out = []
    # N > 0: batch of 2, image prompt + left-padded text prompt.
    ids, _ = _batch(ref, [ref.prompt_ids("Describe the picture.", 1), ref.prompt_ids("Hello there.", 0)], pad)
    got, got_ds = engine.embed(ids, feats, ds if deepstack else None)
    want = ref.inject(ref.text_embeds(ids), ids, feats)
    out += compare("embedding", "batch 2, N>0", got, want, tol)
    if deepstack:
        out += compare("embedding", "deepstack_embeds batch 2, N>0", got_ds, ref.deepstack_dense(ids, ds), tol)
    # N = 0: decode-step shape, batch of 2.
    ids0 = np.array([[5, 17, 42], [99, 3, 250]], np.int64)
    got0, _ = engine.embed(ids0, None, None)
    out += compare("embedding", "batch 2, N=0", got0, ref.text_embeds(ids0), tol)
    return out


def check_decoder(engine: Engine, ref: Reference, image, tol: dict, deepstack: bool, steps: int = 3) -> list[CheckResult]:
    """Prefill (empty past) and decode steps (with past), batch of 2 with left padding, image-derived
    3-D positions. HF side: the full model forward, positions computed by HF from mm_token_type_ids."""
    cfg = ref.config
    pad = pad_id(cfg.text_config.pad_token_id)
    pv, grid = ref.hf_pixels(image)
    feats, ds = ref.vision(pv, grid)
    ids, mask = _batch(ref, [ref.prompt_ids("What is in the image?", 1), ref.prompt_ids("Say something.", 0)], pad)
    embeds = ref.inject(ref.text_embeds(ids), ids, feats)
    dense = ref.deepstack_dense(ids, ds) if deepstack else None
    positions, deltas = mrope.rope_index(
        ids, mask, grid.numpy(), image_token_id=cfg.image_token_id, vision_start_token_id=cfg.vision_start_token_id,
        spatial_merge_size=ref.params.merge_size,
    )
    logits, past = engine.decode(embeds, mask, positions, engine.empty_past(2), dense)
    want = ref.logits(ids, mask, pv, grid)
    attended = mask.astype(bool)
    out = compare("decoder", "prefill batch 2 left-padded, empty past", logits[attended], want[attended], tol, logits=True)
    got_steps, want_steps = [], []
    for _ in range(steps):
        nxt = want[:, -1].argmax(-1).reshape(2, 1).astype(np.int64)
        ids = np.concatenate([ids, nxt], 1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = mrope.decode_position_ids(deltas, attention_mask=mask, new_tokens=1)
        step_logits, past = engine.decode(ref.text_embeds(nxt), mask, pos, past, None)
        want = ref.logits(ids, mask, pv, grid)
        got_steps.append(step_logits[:, -1])
        want_steps.append(want[:, -1])
    out += compare("decoder", f"{steps} decode steps with past", np.stack(got_steps), np.stack(want_steps), tol, logits=True)
    return out
