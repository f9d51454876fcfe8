"""The PyTorch side of every comparison: the HF model run the way HF runs it.

Inputs are real: images through the HF image processor, prompts through the checkpoint's chat template,
3-D positions computed by HF itself (`mm_token_type_ids` passed, or HF silently uses 1-D positions).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from vlmforge.registry import get_family
from vlmforge.host import prompt as P
from vlmforge.host.image import ImageParams


def _memo_key(args, kwargs) -> tuple:
    """The identity of a vision call's inputs: each tensor by shape, dtype and a digest of its bytes."""
    def one(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous().cpu().reshape(-1)
            return ("tensor", tuple(v.shape), str(t.dtype), hashlib.blake2b(t.view(torch.uint8).numpy()).hexdigest())
        return ("value", repr(v))

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


def grid_tokens(grid_thw, merge_size: int) -> list[int]:
    """Image tokens of each row of `image_grid_thw` (t*h*w patches, merge_size² per token)."""
    return [int(t * h * w) // (merge_size * merge_size) for t, h, w in np.asarray(grid_thw).tolist()]


class Reference:
    def __init__(self, family_key: str, hf_model, source_path: Path, params: ImageParams) -> None:
        import transformers

        family = get_family(family_key, where="vlmforge.validators.reference.Reference")
        self.family_key = family_key
        self.model = hf_model
        self.config = hf_model.config
        self.params = params
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(source_path))
        self.image_processor = getattr(transformers, family.image.processor_class).from_pretrained(str(source_path))
        self._reference_vision = family.reference_vision
        self.eos = hf_model.generation_config.eos_token_id  # kept: the graph pass runs after release()
        self._vision_memo: OrderedDict = OrderedDict()
        self._memoize_vision()

    # The reference runs the vision tower on the same pixels many times: the features themselves, then HF's full
    # forward (which takes pixel_values) for the prefill and again for every decode step (use_cache off), HF
    # generate, the versus-FP32 prefill and the same-weight pass. A layer-streamed tower reads its 32 blocks
    # from the checkpoint on each of those calls (minutes at real size). The tower's outputs are kept by its
    # inputs and handed back as copies: the values a second call would compute, without computing them. What
    # changes the tower (its weights, DeepStack off) must call forget_vision().
    VISION_MEMO_ENTRIES = 8

    def _memoize_vision(self) -> None:
        visual = getattr(getattr(self.model, "model", self.model), "visual", None)
        if visual is None:
            return
        compute = visual.forward

        def forward(*args, **kwargs):
            key = _memo_key(args, kwargs)
            if key in self._vision_memo:
                self._vision_memo.move_to_end(key)
            else:
                self._vision_memo[key] = compute(*args, **kwargs)
                while len(self._vision_memo) > self.VISION_MEMO_ENTRIES:
                    self._vision_memo.popitem(last=False)
            return copy.deepcopy(self._vision_memo[key])

        visual.forward = forward

    def forget_vision(self) -> None:
        """Drop the kept vision outputs: the tower's weights or behaviour are about to change."""
        self._vision_memo.clear()

    def release(self) -> None:
        """Drop the model: what stays (tokenizer, image processor, config) is what the graph pass needs.
        The caller drops its own reference too; the memory returns at the next garbage collection."""
        self.model = None
        self._vision_memo.clear()

    # -- inputs -----------------------------------------------------------------------------------
    def hf_pixels(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's own image processor on the original image: forced to a fixed set's size (square inputs land
        exactly on it), or, for a dynamic set, its smart_resize within the set's pixel budget."""
        out = self.image_processor(
            images=[image],
            size=self.params.hf_size,
            patch_size=self.params.patch_size,
            merge_size=self.params.merge_size,
            return_tensors="pt",
        )
        return out["pixel_values"].float(), out["image_grid_thw"]

    def prompt_ids(self, text: str, n_images: int, tokens: list[int] | None = None) -> list[int]:
        """The chat prompt with `n_images` images, each expanded to its `tokens` (default: a fixed set's
        tokens_per_image; a dynamic set's callers pass each image's count, `grid_tokens`)."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return P.expand_image_tokens(
            ids, list(tokens) if tokens is not None else [self.params.tokens_per_image for _ in range(n_images)],
            self.config.image_token_id,
            vision_start_token_id=self.config.vision_start_token_id,
        )

    # -- model --------------------------------------------------------------------------------------
    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        out = self._reference_vision(self.model, pixel_values, grid_thw)
        if isinstance(out, tuple):
            return out[0].float().numpy(), (out[1].float().numpy() if out[1] is not None else None)
        return out.float().numpy(), None

    def _mm_kwargs(self, input_ids: torch.Tensor, pixel_values, grids) -> dict:
        kw = {"mm_token_type_ids": torch.from_numpy(P.mm_token_type_ids(input_ids.numpy(), self.config.image_token_id))}
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values
            kw["image_grid_thw"] = grids
        return kw

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values=None, grids=None) -> np.ndarray:
        ids = torch.from_numpy(input_ids.astype(np.int64))
        out = self.model(
            input_ids=ids,
            attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
            use_cache=False,
            **self._mm_kwargs(ids, pixel_values, grids),
        )
        return out.logits.float().numpy()

    @torch.no_grad()
    def text_embeds(self, input_ids: np.ndarray) -> np.ndarray:
        emb = self.model.get_input_embeddings()(torch.from_numpy(input_ids.astype(np.int64)))
        return emb.float().numpy()

    @torch.no_grad()
    def generate(self, input_ids: np.ndarray, pixel_values, grids, new_tokens: int,
                 stop_at_eos: bool = False) -> tuple[list[int], np.ndarray]:
        """Greedy HF generate: exactly `new_tokens` tokens (EOS suppressed until then, as min_new_tokens),
        or with `stop_at_eos` up to `new_tokens`, stopping at EOS."""
        ids = torch.from_numpy(input_ids.astype(np.int64))
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=0 if stop_at_eos else new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **self._mm_kwargs(ids, pixel_values, grids),
        )
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logits = torch.stack([lg[0] for lg in out.logits]).float().numpy()
        return tokens, logits

    def inject(self, embeds: np.ndarray, input_ids: np.ndarray, features: np.ndarray) -> np.ndarray:
        """HF's injection: masked_scatter of the features into the image-token positions."""
        e = torch.from_numpy(embeds)
        mask = torch.from_numpy(input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(e)
        return e.masked_scatter(mask, torch.from_numpy(features).to(e.dtype)).numpy()

    def deepstack_dense(self, input_ids: np.ndarray, deepstack: np.ndarray) -> np.ndarray:
        """[L, N, H] features -> dense [L, B, S, H], zeros at text positions (what HF adds per layer)."""
        L, _, H = deepstack.shape
        b, s = input_ids.shape
        dense = np.zeros((L, b, s, H), np.float32)
        mask = input_ids == self.config.image_token_id
        dense[:, mask, :] = deepstack
        return dense
