#!/usr/bin/env python3
"""Independent end-to-end check of a vlmforge artifact set.

Reads ONLY the manifest, the ONNX files and the source checkpoint — no vlmforge code is imported. Pixels
come from HF's own image processor, 3-D positions from HF's own `get_rope_index`, and the three graphs run
in onnxruntime by the I/O names the manifest declares. Greedy decoding through the graphs must reproduce
HF `generate` token for token on an image and prompt of this script's own choosing.

Being independent, it keeps its own facts and reads nothing of vlmforge's family table: the model class is
the one the checkpoint's config.json names, the image processor is HF's Qwen2-VL processor (both families').

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


class Graphs:
    """The three graphs of an artifact set and the HF pieces needed to feed them (no vlmforge code)."""

    def __init__(self, artifacts: Path, checkpoint: Path) -> None:
        m = json.loads((artifacts / "manifest.json").read_text())
        for rel, want in m["files"].items():  # the artifact files are the ones the manifest describes
            assert sha256(artifacts / rel) == want["sha256"], f"{rel} does not match the manifest"
        for name, want in m["source"]["weights"].items():  # and the checkpoint is the one they were built from
            assert sha256(checkpoint / name) == want, f"checkpoint {name} differs from the manifest"
        self.m = m
        comps = m["components"]
        self.sess = {k: ort.InferenceSession(str(artifacts / c["file"]), providers=["CPUExecutionProvider"]) for k, c in comps.items()}
        dec_in = {t["name"]: t for t in comps["decoder"]["inputs"]}
        self.layers = sorted({int(n.split(".")[1]) for n in dec_in if n.startswith("past_key_values.")})
        self.kv_heads, self.head_dim = dec_in["past_key_values.0.key"]["shape"][1], dec_in["past_key_values.0.key"]["shape"][3]
        self.deep = "deepstack_embeds" in dec_in
        self.size = comps["vision"]["image_size"]
        # The HF class the checkpoint itself names (HF's mapping, not a vlmforge family table).
        cls = getattr(transformers, json.loads((Path(checkpoint) / "config.json").read_text())["architectures"][0])
        self.model = cls.from_pretrained(str(checkpoint), dtype=torch.float32, use_safetensors=True).eval()
        self.tok = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
        self.proc = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint))
        eos = m["token_ids"]["eos"]
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def inputs(self, image, prompt: str):
        s = self.size
        pix = self.proc(images=[image], size={"shortest_edge": s * s, "longest_edge": s * s}, return_tensors="pt")
        pv, grid = pix["pixel_values"].float(), pix["image_grid_thw"]
        n_tok = int(grid.prod()) // (self.model.config.vision_config.spatial_merge_size ** 2)
        text = self.tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                            add_generation_prompt=True, tokenize=False)
        image_id = self.m["token_ids"]["image"]
        text = text.replace(self.tok.decode([image_id]), self.tok.decode([image_id]) * n_tok, 1)
        ids = torch.tensor([self.tok(text, add_special_tokens=False)["input_ids"]])
        return ids, pv, grid, n_tok

    def hf_generate(self, ids, pv, grid, tokens: int, min_tokens: int) -> list[int]:
        mm = (ids == self.m["token_ids"]["image"]).long()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                                      mm_token_type_ids=mm, max_new_tokens=tokens, min_new_tokens=min_tokens, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    def onnx_generate(self, ids, pv, grid, tokens: int, min_tokens: int) -> list[int]:
        """Greedy through the three graphs; positions from HF's own get_rope_index; stops at EOS after min_tokens."""
        mm = (ids == self.m["token_ids"]["image"]).long()
        with torch.no_grad():
            pos, deltas = self.model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=torch.ones_like(ids))
        s = self.sess
        vis = dict(zip([o.name for o in s["vision"].get_outputs()],
                       s["vision"].run(None, {"pixel_values": pv.numpy(), "image_grid_thw": grid.numpy()})))
        hidden = vis["image_features"].shape[1]
        n_deep = len(vis["deepstack_features"]) if self.deep else 0

        def embed(input_ids, feats, deep):
            feed = {"input_ids": input_ids, "image_features": feats}
            if self.deep:
                feed["deepstack_features"] = deep
            return dict(zip([o.name for o in s["embedding"].get_outputs()], s["embedding"].run(None, feed)))

        emb = embed(ids.numpy(), vis["image_features"], vis.get("deepstack_features"))
        feed = {"inputs_embeds": emb["inputs_embeds"], "attention_mask": np.ones(ids.shape, np.int64), "position_ids": pos.numpy(),
                **{f"past_key_values.{i}.{k}": np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for i in self.layers for k in ("key", "value")}}
        if self.deep:
            feed["deepstack_embeds"] = emb["deepstack_embeds"]
        ours, total = [], ids.shape[1]
        for step in range(tokens):
            out = dict(zip([o.name for o in s["decoder"].get_outputs()], s["decoder"].run(None, feed)))
            logits = out["logits"][0, -1].copy()
            if step < min_tokens:  # as HF min_new_tokens: EOS suppressed until the length is reached
                logits[list(self.eos)] = -np.inf
            nxt = int(logits.argmax())
            ours.append(nxt)
            if nxt in self.eos:
                break
            total += 1
            e = embed(np.array([[nxt]], np.int64), np.zeros((0, hidden), np.float32), np.zeros((n_deep, 0, hidden), np.float32))
            feed = {"inputs_embeds": e["inputs_embeds"], "attention_mask": np.ones((1, total), np.int64),
                    "position_ids": np.full((3, 1, 1), (total - 1) + int(deltas[0, 0]), np.int64),
                    **{f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in self.layers for k in ("key", "value")}}
            if self.deep:
                feed["deepstack_embeds"] = np.zeros((n_deep, 1, 1, hidden), np.float32)
        return ours


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the source Hugging Face folder")
    ap.add_argument("--prompt", default="What do you see in this picture? Answer in detail.")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    g = Graphs(args.artifacts, args.checkpoint)
    ids, pv, grid, n_tok = g.inputs(own_image(), args.prompt)
    hf_tokens = g.hf_generate(ids, pv, grid, args.tokens, args.tokens)
    ours = g.onnx_generate(ids, pv, grid, args.tokens, args.tokens)
    same = sum(a == b for a, b in zip(ours, hf_tokens))
    print(f"family {g.m['family']}, image {g.size}px, {n_tok} image tokens, prompt {ids.shape[1]} tokens")
    print(f"HF generate : {hf_tokens}")
    print(f"ONNX graphs : {ours}")
    print(f"{same}/{len(hf_tokens)} tokens identical")
    return 0 if ours == hf_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
