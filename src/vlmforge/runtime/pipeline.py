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
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmforge.core.contracts import StageContract
from vlmforge.core.errors import ArtifactError, InputError
from vlmforge.host import prompt as P
from vlmforge.artifact.manifest import MANIFEST, RELEASE_FILES, check_verified
from vlmforge.core.paths import confine
from vlmforge.runtime.engine import Engine, KVLayout
from vlmforge.artifact.runtime_configs import GENAI_CONFIG, RUNTIME_CONFIG
from vlmforge.runtime.kv import MODES, device_of
from vlmforge.runtime.loop import GenerationStats, PromptInputs, TokenIds, decode_steps, prefill
from vlmforge.host.preprocess import image_to_patches, load_image
from vlmforge.host.tokens import eos_ids
from vlmforge.runtime.sampling import sample_next

log = logging.getLogger(__name__)

__all__ = ["Chat", "GenerationStats", "Pipeline", "SamplingParams", "verify_artifacts"]


# -- artifact verification ----------------------------------------------------------------------------
def resolve_inside(directory: Path, rel: str) -> Path:
    """`directory/rel`, confined to the artifact set (vlmforge.core.paths.confine)."""
    return confine(directory, rel, where=str(Path(directory) / MANIFEST))


def verify_artifacts(directory: Path) -> dict:
    """The one verification (manifest.verify_dir): every listed file's size and sha256, no links, nothing
    unlisted; then the manifest's own consistency. Returns the manifest."""
    directory = Path(directory)
    manifest = check_verified(directory, "the runtime loads verified sets only", RELEASE_FILES)
    for stage, comp in manifest["components"].items():
        if comp["file"] not in manifest["files"]:
            raise ArtifactError(f"component {stage} file {comp['file']} is not listed in the manifest's files",
                                where=str(directory / MANIFEST), fix="rebuild the artifact set")
    if not manifest["validation"]["passed"]:
        log.warning("%s: the manifest records no passing validation (built with validation off?)", directory)
    return manifest


# -- parameters ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self, where: str) -> None:
        rules = (
            ("max_new_tokens", isinstance(self.max_new_tokens, (int, np.integer)) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 = off)"),
            ("seed", self.seed is None or isinstance(self.seed, (int, np.integer)), "an integer or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        )
        for name, ok, valid in rules:
            if not ok:
                raise InputError(f"{name}={getattr(self, name)!r} is out of range", where=f"{where}({name}=...)",
                                 fix=f"pass {name} as {valid}")


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


# -- incremental detokenization with stop strings -------------------------------------------------------
class TextStream:
    """Token ids in, text pieces out, as tokens arrive.

    Byte-level BPE splits multi-byte characters over several tokens; a piece is released only when
    the decoded text no longer ends in U+FFFD (an incomplete UTF-8 sequence). Text that could be the
    start of a stop string is held back until it is known not to be one; the text ends before the first
    stop string. The concatenation of all pieces equals `tokenizer.decode(tokens)` (up to a stop string).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.done = False  # a stop string was reached
        self._prefix = 0
        self._read = 0
        self._pending = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        if self.done:
            return ""
        self.tokens.append(int(token))
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return self._release(after[len(before):], final=False)

    def finish(self) -> str:
        """Release what is still held (an incomplete character decodes as U+FFFD, as a full decode does)."""
        if self.done:
            return ""
        before = self._decode(self.tokens[self._prefix:self._read])
        after = self._decode(self.tokens[self._prefix:])
        self._prefix = self._read = len(self.tokens)
        return self._release(after[len(before):], final=True)

    def _release(self, delta: str, final: bool) -> str:
        self._pending += delta
        out = self._pending
        if self.stop:
            hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                out, self.done = self._pending[:min(hits)], True
            elif not final:
                keep = max((k for s in self.stop for k in range(1, min(len(s), len(out) + 1))
                            if out.endswith(s[:k])), default=0)
                out = out[:len(out) - keep]
        self._pending = self._pending[len(out):] if not self.done else ""
        self.text += out
        return out


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
        self.image_size = int(vis["image_size"])
        self.tokens_per_image = int(vis["tokens_per_image"])
        self._pp = {
            "size": self.image_size,
            "patch_size": int(pp.get("patch_size", 14)),
            "temporal_patch_size": int(pp.get("temporal_patch_size", 2)),
            "merge_size": int(pp.get("merge_size", 2)),
            "mean": tuple(pp.get("mean", (0.5, 0.5, 0.5))),
            "std": tuple(pp.get("std", (0.5, 0.5, 0.5))),
        }
        tid = manifest["token_ids"]
        self.ids = TokenIds(int(tid["image"]), int(tid["vision_start"]), tuple(eos), self._pp["merge_size"])
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
        runtime = _listed_json(directory, manifest, RUNTIME_CONFIG)
        genai = _listed_json(directory, manifest, GENAI_CONFIG)
        generation = _listed_json(directory, manifest, "generation_config.json")
        eos = _eos_ids(manifest["token_ids"].get("eos"), runtime.get("eos_token_ids"), generation.get("eos_token_id"))
        pad = runtime.get("pad_token_id", manifest["token_ids"].get("pad"))
        pad = pad if pad is not None else eos[0]
        tokenizer = _load_tokenizer(directory)
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
        params = _params(kwargs, "Pipeline.stream")
        start = time.perf_counter()
        images = _image_list(images)
        prepared = self.prepare([_user(prompt, len(images))], images, params, "Pipeline.stream")
        return self._stream(prepared, params, start)

    def generate_batch(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None, **kwargs) -> list[str]:
        """Replies to several independent prompts run as one left-padded batch."""
        params = _params(kwargs, "Pipeline.generate_batch")
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
        if self.context_length and n_img * self.tokens_per_image >= self.context_length:
            raise InputError(
                f"{n_img} images take {n_img * self.tokens_per_image} tokens ({self.tokens_per_image} each); "
                f"the model's context is {self.context_length} tokens",
                where=f"{where}(images=...)",
                fix=f"pass at most {max((self.context_length - 1) // self.tokens_per_image - 1, 0)} images per conversation",
            )
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        ids = P.expand_image_tokens(ids, [self.tokens_per_image] * n_img, self.ids.image,
                                    vision_start_token_id=self.ids.vision_start)
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
        patches = tuple(image_to_patches(img, **self._pp) for img in loaded)
        arr = np.asarray(ids, np.int64)
        return Prepared(PromptInputs(arr, patches), arr)

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
        params = _params(kwargs, "Chat.stream")
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


def _params(kwargs: dict, where: str) -> SamplingParams:
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InputError(f"unknown generation option(s) {unknown}", where=where, fix=f"use {sorted(known)}")
    if "stop" in kwargs:
        stop = kwargs["stop"]
        kwargs = {**kwargs, "stop": (stop,) if isinstance(stop, str) else tuple(stop or ())}
    return SamplingParams(**kwargs)


def layout_from_manifest(manifest: dict, where: str) -> KVLayout:
    """KV layout from the decoder's (and embedding's) I/O contract recorded in the manifest."""
    return KVLayout.from_contract(StageContract.from_json("decoder", manifest["components"]["decoder"]), where,
                                  error=ArtifactError)


def check_providers(providers, where: str) -> list[str] | None:
    """Every requested execution provider must exist in this onnxruntime: no silent fallback to CPU."""
    if providers is None:
        return None
    import onnxruntime as ort

    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown or not providers:
        raise InputError(f"execution provider(s) {unknown or providers} are not available in this onnxruntime "
                         f"({ort.__version__}); available: {available}", where=where,
                         fix="pass one of the available providers (e.g. --provider CPUExecutionProvider), or install "
                             "the onnxruntime build that has it (onnxruntime-gpu for CUDAExecutionProvider)")
    return list(providers)


def check_engine(engine: Engine, manifest: dict, files: dict, where: str) -> None:
    """Each opened graph must be the one the manifest describes: its I/O (names, dtypes, dims) equals the
    component's contract and its weights match the precision label. One error naming every difference."""
    from vlmforge.runtime.engine import contract_problems, precision_problems

    problems = []
    for stage in ("vision", "embedding", "decoder"):
        comp = manifest["components"][stage]
        found = contract_problems(getattr(engine, stage), comp) + precision_problems(files[stage], comp["precision"])
        problems += [f"{stage} ({comp['file']}): {p}" for p in found]
    if problems:
        raise ArtifactError("the graphs are not the ones the manifest describes: " + "; ".join(problems)[:1500],
                            where=where, fix="rebuild the artifact set with `vlmforge export`, or fetch the release again")


def _listed_json(directory: Path, manifest: dict, name: str) -> dict:
    if name not in manifest["files"]:
        return {}
    path = resolve_inside(directory, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{name} is not valid JSON ({type(exc).__name__})", where=str(path),
                            fix="rebuild the artifact set") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{name} holds a JSON {type(data).__name__}, not an object", where=str(path),
                            fix="rebuild the artifact set")
    return data


def _eos_ids(*sources) -> tuple[int, ...]:
    out = eos_ids(*sources)
    if not out:
        raise ArtifactError("the artifact set names no end-of-sequence token", where="manifest token_ids.eos",
                            fix="rebuild the artifact set from a checkpoint whose config sets eos_token_id")
    return out


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise ArtifactError(f"cannot load the tokenizer: {type(exc).__name__}: {str(exc)[:300]}", where=str(directory),
                            fix="the artifact set needs tokenizer.json + tokenizer_config.json; rebuild it") from exc
    if not getattr(tok, "chat_template", None):
        raise ArtifactError("the tokenizer has no chat template", where=str(directory),
                            fix="rebuild from a checkpoint with chat_template.jinja or tokenizer_config.json chat_template")
    return tok
