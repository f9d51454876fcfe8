#!/usr/bin/env python3
"""Independent end-to-end check of a vlmforge artifact set.

Reads ONLY the manifest, the ONNX files and the source checkpoint — no vlmforge code is imported. Pixels
come from HF's own image processor, 3-D positions from HF's own `get_rope_index`, and the three graphs run
in onnxruntime by the I/O names the manifest declares. Greedy decoding through the graphs must reproduce
HF `generate` token for token on an image and prompt of this script's own choosing.

    python scripts/independent_check.py artifacts/tiny-qwen2_5_vl/fp32-392 --checkpoint .work/fixtures/tiny-qwen2_5_vl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from PIL import Image, ImageDraw


def own_image(size: int = 640) -> Image.Image:
    """A scene this script draws itself: sky, sun, house, not any image vlmforge generates."""
    img = Image.new("RGB", (size, size), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, size * 2 // 3, size, size], fill=(60, 150, 60))
    d.ellipse([size * 0.7, size * 0.08, size * 0.9, size * 0.28], fill=(250, 220, 40))
    d.rectangle([size * 0.2, size * 0.45, size * 0.5, size * 0.75], fill=(180, 70, 50))
    d.polygon([(size * 0.17, size * 0.45), (size * 0.35, size * 0.3), (size * 0.53, size * 0.45)], fill=(90, 40, 30))
    return img


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the source Hugging Face folder")
    ap.add_argument("--prompt", default="What do you see in this picture? Answer in detail.")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    m = json.loads((args.artifacts / "manifest.json").read_text())
    for rel, want in m["files"].items():  # the artifact files are the ones the manifest describes
        assert sha256(args.artifacts / rel) == want["sha256"], f"{rel} does not match the manifest"
    for name, want in m["source"]["weights"].items():  # and the checkpoint is the one they were built from
        assert sha256(args.checkpoint / name) == want, f"checkpoint {name} differs from the manifest"

    comps = m["components"]
    sess = {k: ort.InferenceSession(str(args.artifacts / c["file"]), providers=["CPUExecutionProvider"]) for k, c in comps.items()}
    dec_in = {t["name"]: t for t in comps["decoder"]["inputs"]}
    layers = sorted({int(n.split(".")[1]) for n in dec_in if n.startswith("past_key_values.")})
    kv_heads, head_dim = dec_in["past_key_values.0.key"]["shape"][1], dec_in["past_key_values.0.key"]["shape"][3]
    deep = "deepstack_embeds" in dec_in
    size = comps["vision"]["image_size"]

    cls = getattr(transformers, {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}[m["family"]])
    model = cls.from_pretrained(str(args.checkpoint), dtype=torch.float32, use_safetensors=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(args.checkpoint))
    proc = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(args.checkpoint))

    pix = proc(images=[own_image()], size={"shortest_edge": size * size, "longest_edge": size * size}, return_tensors="pt")
    pv, grid = pix["pixel_values"].float(), pix["image_grid_thw"]
    n_tok = int(grid.prod()) // (model.config.vision_config.spatial_merge_size ** 2)
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}],
                                   add_generation_prompt=True, tokenize=False)
    image_id = m["token_ids"]["image"]
    text = text.replace(tok.decode([image_id]), tok.decode([image_id]) * n_tok, 1)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    mm = (ids == image_id).long()

    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                            mm_token_type_ids=mm, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        pos, deltas = model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=torch.ones_like(ids))
    hf_tokens = hf[0, ids.shape[1]:].tolist()

    vis = dict(zip([o.name for o in sess["vision"].get_outputs()],
                   sess["vision"].run(None, {"pixel_values": pv.numpy(), "image_grid_thw": grid.numpy()})))
    emb_feed = {"input_ids": ids.numpy(), "image_features": vis["image_features"]}
    if deep:
        emb_feed["deepstack_features"] = vis["deepstack_features"]
    emb = dict(zip([o.name for o in sess["embedding"].get_outputs()], sess["embedding"].run(None, emb_feed)))
    past = {f"past_key_values.{i}.{k}": np.zeros((1, kv_heads, 0, head_dim), np.float32) for i in layers for k in ("key", "value")}
    feed = {"inputs_embeds": emb["inputs_embeds"], "attention_mask": np.ones(ids.shape, np.int64), "position_ids": pos.numpy(), **past}
    if deep:
        feed["deepstack_embeds"] = emb["deepstack_embeds"]
    eos = m["token_ids"]["eos"]
    eos = set(eos if isinstance(eos, list) else [eos])
    ours, total = [], ids.shape[1]
    for step in range(args.tokens):
        out = dict(zip([o.name for o in sess["decoder"].get_outputs()], sess["decoder"].run(None, feed)))
        logits = out["logits"][0, -1].copy()
        if step < args.tokens:  # same as HF min_new_tokens: EOS suppressed until the length is reached
            logits[list(eos)] = -np.inf
        nxt = int(logits.argmax())
        ours.append(nxt)
        total += 1
        e = sess["embedding"].run(None, {"input_ids": np.array([[nxt]], np.int64), "image_features": np.zeros((0, vis["image_features"].shape[1]), np.float32),
                                         **({"deepstack_features": np.zeros((len(vis["deepstack_features"]), 0, vis["image_features"].shape[1]), np.float32)} if deep else {})})
        p = (total - 1) + int(deltas[0, 0])
        feed = {"inputs_embeds": e[0], "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.full((3, 1, 1), p, np.int64),
                **{f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in layers for k in ("key", "value")}}
        if deep:
            feed["deepstack_embeds"] = np.zeros((len(vis["deepstack_features"]), 1, 1, e[0].shape[-1]), np.float32)

    same = sum(a == b for a, b in zip(ours, hf_tokens))
    print(f"family {m['family']}, image {size}px, {n_tok} image tokens, prompt {ids.shape[1]} tokens")
    print(f"HF generate : {hf_tokens}")
    print(f"ONNX graphs : {ours}")
    print(f"{same}/{len(hf_tokens)} tokens identical")
    return 0 if ours == hf_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
