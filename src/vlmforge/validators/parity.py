"""Each graph alone against the PyTorch model, on real inputs (images through the image processor,
chat prompts through the chat template).

Every check is two functions: `reference_<check>` runs the PyTorch side and returns the small arrays the
check needs (inputs, features, logits rows); `check_<check>` runs the graph on those inputs and compares.
The reference pass runs every `reference_*` with the model resident, then the model is freed before any
onnxruntime session opens (validators/suite.py): PyTorch and ONNX weights are never in memory together.
"""

from __future__ import annotations

import numpy as np

from vlmforge.host import mrope
from vlmforge.host.tokens import left_pad, pad_id
from vlmforge.runtime.engine import Engine
from vlmforge.validators.reference import Reference, grid_tokens
from vlmforge.validators.metrics import compare
from vlmforge.validators.results import CheckResult


def check_preprocess(ref: Reference, images, tol: dict) -> list[CheckResult]:
    """vlmforge's numpy preprocessing (what the runtime ships) vs HF's image processor (no model needed)."""
    out = []
    for i, img in enumerate(images):
        ours, grid = ref.params.patches(img)
        hf, hf_grid = ref.hf_pixels(img)
        same_grid = list(grid[0]) == hf_grid[0].tolist()
        out += compare("preprocess", f"pixel_values image {i}", ours if same_grid else ours[:0], hf.numpy(), tol)
    return out


def reference_vision(ref: Reference, images, dynamic: bool = False) -> list[dict]:
    """Per image: HF pixels and grid, and the model's features (and DeepStack features). `dynamic` (a
    dynamic set): the rows name each image's size and grid, and one more row runs the first two images, of
    different sizes, in one call."""
    rows = []
    for i, img in enumerate(images):
        pv, grid = ref.hf_pixels(img)
        feats, ds = ref.vision(pv, grid)
        name = f"image {i}" + (f" ({img.size[0]}x{img.size[1]} px, grid {grid.tolist()[0]})" if dynamic else "")
        rows.append({"pv": pv.numpy(), "grid": grid.numpy(), "feats": feats, "ds": ds, "name": name})
    if dynamic and len(rows) >= 2:
        import torch

        pv = np.concatenate([rows[0]["pv"], rows[1]["pv"]])
        grid = np.concatenate([rows[0]["grid"], rows[1]["grid"]])
        feats, ds = ref.vision(torch.from_numpy(pv), torch.from_numpy(grid))
        rows.append({"pv": pv, "grid": grid, "feats": feats, "ds": ds,
                     "name": f"images 0+1 in one call (grids {grid.tolist()})"})
    return rows


def check_vision(engine: Engine, want: list[dict], tol: dict, deepstack: bool) -> list[CheckResult]:
    out = []
    for i, w in enumerate(want):
        feats, ds = engine.encode_image(w["pv"], w["grid"])
        name = w.get("name", f"image {i}")
        out += compare("vision", f"image_features {name}", feats, w["feats"], tol)
        if deepstack:
            out += compare("vision", f"deepstack_features {name}", ds, w["ds"], tol)
    return out


def reference_embedding(ref: Reference, vision0: dict, deepstack: bool) -> dict:
    """N > 0: batch of 2, image prompt + left-padded text prompt; N = 0: decode-step shape, batch of 2."""
    pad = pad_id(ref.config.text_config.pad_token_id)
    tokens = grid_tokens(vision0["grid"], ref.params.merge_size)
    ids, _ = left_pad([ref.prompt_ids("Describe the picture.", 1, tokens), ref.prompt_ids("Hello there.", 0)], pad)
    ids0 = np.array([[5, 17, 42], [99, 3, 250]], np.int64)
    feats, ds = vision0["feats"], vision0["ds"]
    return {"ids": ids, "feats": feats, "ds": ds if deepstack else None,
            "want": ref.inject(ref.text_embeds(ids), ids, feats),
            "want_ds": ref.deepstack_dense(ids, ds) if deepstack else None,
            "ids0": ids0, "want0": ref.text_embeds(ids0)}


def check_embedding(engine: Engine, w: dict, tol: dict, deepstack: bool) -> list[CheckResult]:
    got, got_ds = engine.embed(w["ids"], w["feats"], w["ds"])
    out = compare("embedding", "batch 2, N>0", got, w["want"], tol)
    if deepstack:
        out += compare("embedding", "deepstack_embeds batch 2, N>0", got_ds, w["want_ds"], tol)
    got0, _ = engine.embed(w["ids0"], None, None)
    out += compare("embedding", "batch 2, N=0", got0, w["want0"], tol)
    return out


def reference_decoder(ref: Reference, vision0: dict, deepstack: bool, steps: int = 3) -> dict:
    """Prefill (empty past) and decode steps (with past), batch of 2 with left padding, image-derived
    3-D positions. HF side: the full model forward, positions computed by HF from mm_token_type_ids.
    Kept: the graph's inputs, the attended prefill logits rows and the last row of each step."""
    import torch

    cfg = ref.config
    pad = pad_id(cfg.text_config.pad_token_id)
    pv, grid = torch.from_numpy(vision0["pv"]), torch.from_numpy(vision0["grid"])
    tokens = grid_tokens(vision0["grid"], ref.params.merge_size)
    ids, mask = left_pad([ref.prompt_ids("What is in the image?", 1, tokens), ref.prompt_ids("Say something.", 0)],
                         pad)
    positions, deltas = mrope.rope_index(
        ids, mask, vision0["grid"], image_token_id=cfg.image_token_id, vision_start_token_id=cfg.vision_start_token_id,
        spatial_merge_size=ref.params.merge_size,
    )
    w = {"embeds": ref.inject(ref.text_embeds(ids), ids, vision0["feats"]), "mask": mask, "positions": positions,
         "dense": ref.deepstack_dense(ids, vision0["ds"]) if deepstack else None, "steps": []}
    want = ref.logits(ids, mask, pv, grid)
    w["prefill"] = want[mask.astype(bool)]
    for _ in range(steps):
        nxt = want[:, -1].argmax(-1).reshape(2, 1).astype(np.int64)
        del want
        ids = np.concatenate([ids, nxt], 1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = mrope.decode_position_ids(deltas, attention_mask=mask, new_tokens=1)
        want = ref.logits(ids, mask, pv, grid)
        w["steps"].append({"embeds": ref.text_embeds(nxt), "mask": mask, "positions": pos, "want": want[:, -1].copy()})
    return w


def check_decoder(engine: Engine, w: dict, tol: dict) -> list[CheckResult]:
    mask = w["mask"]
    logits, past = engine.decode(w["embeds"], mask, w["positions"], engine.empty_past(2), w["dense"])
    out = compare("decoder", "prefill batch 2 left-padded, empty past", logits[mask.astype(bool)], w["prefill"], tol,
                  logits=True)
    del logits
    got_steps = []
    for s in w["steps"]:
        step_logits, past = engine.decode(s["embeds"], s["mask"], s["positions"], past, None)
        got_steps.append(step_logits[:, -1])
    want_steps = np.stack([s["want"] for s in w["steps"]])
    out += compare("decoder", f"{len(w['steps'])} decode steps with past", np.stack(got_steps), want_steps, tol,
                   logits=True)
    return out
