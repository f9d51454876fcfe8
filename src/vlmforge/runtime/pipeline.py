"""Python API of the vlmforge runtime: load a verified artifact set, generate text from prompts and images.

    from vlmforge.runtime.pipeline import Pipeline

    pipe = Pipeline.load("artifacts/tiny-qwen2_5_vl/fp32-392")
    print(pipe.generate("Describe the picture.", images=["cat.png"], max_new_tokens=64))
    for piece in pipe.stream("Write a haiku.", temperature=0.7, seed=1):
        print(piece, end="", flush=True)
    pipe.generate_batch(["Hi.", "Describe it."], images=[[], ["cat.png"]])
    chat = pipe.chat(); chat.send("Hello"); chat.send("And this?", images=["dog.jpg"])

The manifest is the only entry point: every file it lists is hashed before a session opens, and only
listed files are read. Bad input (unreadable image, sampling parameters out of range, a prompt that
does not fit the context) raises `InputError` before anything runs.

The pieces live beside it: `params` (SamplingParams), `textstream` (incremental detokenization),
`artifacts` (verification and what is read from the manifest); their public names import from here too.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmforge.artifact.manifest import MANIFEST
from vlmforge.artifact.runtime_configs import GENAI_CONFIG, RUNTIME_CONFIG
from vlmforge.core.errors import InputError
from vlmforge.host import prompt as P
from vlmforge.host.dynamic import DynamicImageParams, check_grid
from vlmforge.host.preprocess import image_to_patches, load_image
from vlmforge.host.sizes import FIT_STRETCH, size_from_json, size_hw, size_label
from vlmforge.runtime.artifacts import (check_engine, check_providers, layout_from_manifest, listed_json, load_tokenizer,
                                        required_eos_ids, resolve_inside, verify_artifacts)
from vlmforge.runtime.engine import Engine
from vlmforge.runtime.kv import MODES, device_of
from vlmforge.runtime.loop import GenerationStats, PromptInputs, TokenIds, decode_steps, prefill
from vlmforge.runtime.params import SamplingParams, params_from
from vlmforge.runtime.sampling import sample_next
from vlmforge.runtime.textstream import TextStream


# The runtime's public names, importable from here as before the module was split (params, textstream and
# artifacts hold the pieces).
log = logging.getLogger(__name__)

__all__ = ["Chat", "GenerationStats", "Pipeline", "Prepared", "SamplingParams", "TextStream", "layout_from_manifest",
           "verify_artifacts"]


# -- the pipeline ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """A prompt ready to run: the loop's inputs (token ids + image patches) and the prompt's token ids."""

    inputs: PromptInputs
    prompt_ids: np.ndarray


class Pipeline:
    """A loaded, verified artifact set: tokenizer + chat template, preprocessing, ORT sessions."""

    def __init__(self, directory: Path, manifest: dict, engine: Engine, tokenizer, *, context_length: int | None,
                 eos: tuple[int, ...], pad: int, kv_mode: str, device: str) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.engine = engine
        self.tokenizer = tokenizer
        self.family = manifest["family"]
        vis = manifest["components"]["vision"]
        pp = vis["preprocess"] if "preprocess" in vis else {}
        # a dynamic set: HF's own processing (smart_resize within the set's pixel budget), tokens per image
        # from each image's grid; a fixed set: one size, one token count
        self.dynamic = DynamicImageParams.from_json(pp) if vis.get("vision") == "dynamic" else None
        self.image_size = size_from_json(vis["image_size"]) if self.dynamic is None else None  # a side or (h, w)
        # how a fixed set fits an image of another size to its own (non-square manifests record it)
        self.fit = pp.get("fit", FIT_STRETCH) if self.dynamic is None else None
        self.tokens_per_image = int(vis["tokens_per_image"]) if self.dynamic is None else None
        self._pp = {
            "size": self.image_size,
            "patch_size": int(pp.get("patch_size", 14)),
            "temporal_patch_size": int(pp.get("temporal_patch_size", 2)),
            "merge_size": int(pp.get("merge_size", 2)),
            "mean": tuple(pp.get("mean", (0.5, 0.5, 0.5))),
            "std": tuple(pp.get("std", (0.5, 0.5, 0.5))),
        }
        tid = manifest["token_ids"]
        merge = self.dynamic.merge_size if self.dynamic is not None else self._pp["merge_size"]
        self.ids = TokenIds(int(tid["image"]), int(tid["vision_start"]), tuple(eos), merge)
        if self.dynamic is not None:
            engine.vision_check = functools.partial(check_grid, patch_dim=self.dynamic.patch_dim, merge_size=merge,
                                                    where=f"{directory}: vision inputs")
        self.pad_id = int(pad)
        self.context_length = context_length
        self.kv_mode = kv_mode
        self.device = device
        self.last_stats: GenerationStats | None = None

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory, providers: list[str] | None = None, *, kv_mode: str = "preallocated",
             threads: int = 0) -> "Pipeline":
        """Verify every listed file against the manifest, then open the sessions and the tokenizer.

        `threads`: onnxruntime intra-op threads (0 = all cores). On a machine shared with other work a
        single thread can be faster (a 2-thread pool waits for its descheduled thread); onnxruntime-genai
        defaults to half the hardware threads.
        """
        directory = Path(directory)
        if kv_mode not in MODES:
            raise InputError(f"unknown kv_mode {kv_mode!r}", where="Pipeline.load", fix=f"use one of {', '.join(MODES)}")
        manifest = verify_artifacts(directory)
        comps = manifest["components"]
        layout = layout_from_manifest(manifest, str(directory / MANIFEST))
        files = {s: resolve_inside(directory, comps[s]["file"]) for s in ("vision", "embedding", "decoder")}
        runtime = listed_json(directory, manifest, RUNTIME_CONFIG)
        genai = listed_json(directory, manifest, GENAI_CONFIG)
        generation = listed_json(directory, manifest, "generation_config.json")
        eos = required_eos_ids(manifest["token_ids"].get("eos"), runtime.get("eos_token_ids"), generation.get("eos_token_id"))
        pad = runtime.get("pad_token_id", manifest["token_ids"].get("pad"))
        pad = pad if pad is not None else eos[0]
        tokenizer = load_tokenizer(directory)
        context = runtime.get("context_length") or genai.get("model", {}).get("context_length")
        if not context:
            limit = getattr(tokenizer, "model_max_length", None)
            context = int(limit) if isinstance(limit, int) and limit < 10**8 else None
        if not isinstance(threads, int) or threads < 0:
            raise InputError(f"threads={threads!r}", where="Pipeline.load(threads=...)", fix="pass an integer >= 0 (0 = all cores)")
        providers = check_providers(providers, "Pipeline.load(providers=...) / --provider")
        engine = Engine(files["vision"], files["embedding"], files["decoder"], layout, providers, threads)
        check_engine(engine, manifest, files, str(directory / MANIFEST))
        return cls(directory, manifest, engine, tokenizer, context_length=context, eos=eos, pad=pad,
                   kv_mode=kv_mode, device=device_of(providers))

    # -- public API ---------------------------------------------------------------------------------
    def generate(self, prompt: str, images: Sequence = (), **kwargs) -> str:
        """The reply to one user prompt (with images before the text), as a string."""
        return "".join(self.stream(prompt, images, **kwargs))

    def stream(self, prompt: str, images: Sequence = (), **kwargs) -> Iterator[str]:
        """Like `generate`, yielding text pieces as tokens come. Input is checked before this returns."""
        params = params_from(kwargs, "Pipeline.stream")
        start = time.perf_counter()
        images = _image_list(images)
        prepared = self.prepare([_user(prompt, len(images))], images, params, "Pipeline.stream")
        return self._stream(prepared, params, start)

    def generate_batch(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None, **kwargs) -> list[str]:
        """Replies to several independent prompts run as one left-padded batch."""
        params = params_from(kwargs, "Pipeline.generate_batch")
        if isinstance(prompts, str) or not prompts:
            raise InputError("generate_batch needs a non-empty list of prompts", where="Pipeline.generate_batch(prompts=...)",
                             fix="pass a list of strings (use generate for one prompt)")
        images = [_image_list(i) for i in images] if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} image lists",
                             where="Pipeline.generate_batch(images=...)", fix="pass one (possibly empty) image list per prompt")
        start = time.perf_counter()
        prepared = [self.prepare([_user(p, len(imgs))], imgs, params, f"Pipeline.generate_batch(prompts[{i}])")
                    for i, (p, imgs) in enumerate(zip(prompts, images))]
        return self._run_batch(prepared, params, start)

    def chat(self, system: str | None = None) -> "Chat":
        return Chat(self, system)

    # -- internals ----------------------------------------------------------------------------------
    def load_images(self, images: Sequence, where: str = "images") -> list:
        """Open image paths (PIL images pass through); InputError for anything unreadable."""
        from PIL import Image

        out = []
        for i, img in enumerate(images):
            if isinstance(img, Image.Image):
                out.append(img)
            elif isinstance(img, (str, os.PathLike)):
                out.append(load_image(img))
            else:
                raise InputError(f"image {i} is a {type(img).__name__}", where=f"{where}(images[{i}])",
                                 fix="pass image file paths or PIL images")
        return out

    def prepare(self, messages: list[dict], images: Sequence, params: SamplingParams,
                where: str = "Pipeline.prepare") -> Prepared:
        """The checked prompt inputs of a conversation (chat-template messages + the images they show), for
        `runtime.loop.prefill` or this pipeline's own generation. Everything that can fail on user input
        fails here (InputError), before any session runs."""
        params.check(where)
        loaded = self.load_images(images, where)
        n_img = len(loaded)
        counts = self.image_tokens(loaded, where)
        if self.context_length and sum(counts) >= self.context_length:
            each = f"{self.tokens_per_image} each" if self.dynamic is None else f"{counts} by their sizes"
            fix = (f"pass at most {max((self.context_length - 1) // self.tokens_per_image - 1, 0)} images per conversation"
                   if self.dynamic is None else "pass fewer or smaller images")
            raise InputError(f"{n_img} images take {sum(counts)} tokens ({each}); the model's context is "
                             f"{self.context_length} tokens", where=f"{where}(images=...)", fix=fix)
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        ids = P.expand_image_tokens(ids, counts, self.ids.image, vision_start_token_id=self.ids.vision_start)
        total = len(ids) + params.max_new_tokens
        if self.context_length and total > self.context_length:
            room = self.context_length - len(ids)
            raise InputError(
                f"prompt ({len(ids)} tokens, {n_img} image(s)) + max_new_tokens ({params.max_new_tokens}) = {total} "
                f"tokens exceeds the context length {self.context_length}",
                where=where,
                fix=(f"lower max_new_tokens to {room} or less" if room > 0 else "shorten the prompt or pass fewer images")
                + " (in a chat: /reset to start over)",
            )
        patches = tuple(self.image_patches(img) for img in loaded)
        arr = np.asarray(ids, np.int64)
        return Prepared(PromptInputs(arr, patches), arr)

    def image_tokens(self, images: Sequence, where: str = "images") -> list[int]:
        """`<|image_pad|>` tokens of each (loaded) image: the set's fixed count, or by the image's size."""
        if self.dynamic is None:
            return [self.tokens_per_image] * len(images)
        return [self.dynamic.image_tokens(img) for img in images]

    def image_patches(self, image) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values, image_grid_thw [1, 3]) of one loaded image, as the set's vision graph takes them."""
        if self.dynamic is None:
            note = self.fit_note(image)
            if note:
                log.info("%s", note)
            return image_to_patches(image, **self._pp)
        return self.dynamic.patches(image)

    def fit_note(self, image) -> str | None:
        """How a fixed set fits `image` (a loaded PIL image) to its size, when the sizes differ; None when the
        image is already the set's size (or the set is dynamic: HF's own smart_resize, nothing to say)."""
        if self.dynamic is not None:
            return None
        h, w = size_hw(self.image_size)
        if image.size == (w, h):
            return None
        iw, ih = image.size
        kept = abs(iw / ih - w / h) < 0.01
        return (f"image {iw}x{ih} (width x height) {'resized' if kept else 'stretched'} to {w}x{h}: this set's vision "
                f"input is fixed at {size_label(self.image_size)} px{'' if h == w else ' (height x width)'}, fit={self.fit}; "
                f"aspect ratio "
                f"{iw / ih:.2f} -> {w / h:.2f}" + ("" if kept else " (a vision=dynamic set keeps the aspect ratio)"))

    def _selector(self, prepared: Sequence[Prepared], params: SamplingParams, done: list[bool]):
        rng = np.random.default_rng(params.seed)
        history = [list(p.prompt_ids) for p in prepared]
        plain_greedy = params.temperature == 0 and params.repetition_penalty == 1.0

        def select(scores: np.ndarray, step: int) -> np.ndarray:
            if plain_greedy:
                tokens = np.argmax(scores, axis=-1)
            else:
                tokens = sample_next(scores, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                     repetition_penalty=params.repetition_penalty, generated_ids=history, rng=rng)
            tokens = np.where(done, self.pad_id, tokens).astype(np.int64)
            for row, tok in enumerate(tokens):
                history[row].append(int(tok))
            return tokens

        return select

    def _stream(self, prepared: Prepared, params: SamplingParams, start: float) -> Iterator[str]:
        stats = GenerationStats(preprocess_s=time.perf_counter() - start)
        self.last_stats = stats
        text = TextStream(self.tokenizer, params.stop)
        done = [False]
        state = prefill(self.engine, [prepared.inputs], self.ids, max_new_tokens=params.max_new_tokens,
                        pad_id=self.pad_id, kv_mode=self.kv_mode, device=self.device, stats=stats)
        steps = decode_steps(state, max_new_tokens=params.max_new_tokens, select=self._selector([prepared], params, done))
        try:
            for tokens in steps:
                token = int(tokens[0])
                stats.new_tokens += 1
                if stats.new_tokens == 1:
                    stats.ttft_s = time.perf_counter() - start
                if token in self.ids.eos:
                    break
                piece = text.push(token)
                if piece:
                    yield piece
                if text.done:
                    break
            tail = text.finish()
            if tail:
                yield tail
        finally:
            steps.close()

    def _run_batch(self, prepared: list[Prepared], params: SamplingParams, start: float) -> list[str]:
        stats = GenerationStats(preprocess_s=time.perf_counter() - start)
        self.last_stats = stats
        texts = [TextStream(self.tokenizer, params.stop) for _ in prepared]
        done = [False] * len(prepared)
        state = prefill(self.engine, [p.inputs for p in prepared], self.ids, max_new_tokens=params.max_new_tokens,
                        pad_id=self.pad_id, kv_mode=self.kv_mode, device=self.device, stats=stats)
        steps = decode_steps(state, max_new_tokens=params.max_new_tokens, select=self._selector(prepared, params, done))
        try:
            for tokens in steps:
                stats.new_tokens += 1
                if stats.new_tokens == 1:
                    stats.ttft_s = time.perf_counter() - start
                for row, tok in enumerate(tokens):
                    if done[row]:
                        continue
                    if int(tok) in self.ids.eos:
                        done[row] = True
                        continue
                    texts[row].push(int(tok))
                    done[row] = texts[row].done
                if all(done):
                    break
        finally:
            steps.close()
        for t in texts:
            t.finish()
        return [t.text for t in texts]


class Chat:
    """A multi-turn conversation: keeps the messages (and their images) and re-prefills each turn.

    An interrupted reply (the stream closed early, or Ctrl-C) is kept as far as it got, so the
    conversation stays consistent and usable.
    """

    def __init__(self, pipeline: Pipeline, system: str | None = None) -> None:
        self.pipeline = pipeline
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []

    def send(self, text: str, images: Sequence = (), **kwargs) -> str:
        return "".join(self.stream(text, images, **kwargs))

    def stream(self, text: str, images: Sequence = (), **kwargs) -> Iterator[str]:
        pipe = self.pipeline
        params = params_from(kwargs, "Chat.stream")
        start = time.perf_counter()
        loaded = pipe.load_images(_image_list(images), "Chat.stream")
        messages = self.messages + [_user(text, len(loaded))]
        prepared = pipe.prepare(messages, self.images + loaded, params, "Chat.stream")
        return self._turn(messages, loaded, pipe._stream(prepared, params, start))

    def _turn(self, messages: list[dict], loaded: list, pieces: Iterator[str]) -> Iterator[str]:
        reply: list[str] = []
        try:
            for piece in pieces:
                reply.append(piece)
                yield piece
        finally:
            pieces.close()
            self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
            self.images = self.images + loaded


# -- helpers ------------------------------------------------------------------------------------------------
def _image_list(images) -> list:
    """One image (path or PIL image) or a sequence of them -> a list."""
    from PIL import Image

    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def _user(text: str, n_images: int) -> dict:
    if not isinstance(text, str):
        raise InputError(f"prompt is a {type(text).__name__}", where="prompt", fix="pass the prompt as a string")
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}
