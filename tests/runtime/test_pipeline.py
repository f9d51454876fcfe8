"""The runtime's Python API on a real tiny artifact set: HF parity, streaming, batch, chat, bad input,
artifact verification, and the IOBinding KV cache against the plain numpy decoder path."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from vlmforge.core.errors import ArtifactError, InputError
from vlmforge.fixtures.images import sample_image
from vlmforge.runtime.loop import PromptInputs, generate_tokens, greedy, prefill
from vlmforge.runtime.pipeline import Pipeline, SamplingParams, TextStream

N_TOKENS = 12


@pytest.fixture(scope="module")
def art(qwen25_392):
    return qwen25_392.directory


@pytest.fixture(scope="module")
def pipe(art):
    return Pipeline.load(art)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("runtime-images")
    paths = []
    for seed, size in ((11, (500, 500)), (12, (600, 600)), (13, (640, 360))):  # HF parity: square ones
        p = d / f"img{seed}.png"
        sample_image(seed, size=size).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def hf(work_dirs):
    """The source model, driven the way the validators drive it (chat template, HF image processor)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlmforge.source import fixture_dir
    from vlmforge.host.image import image_params
    from vlmforge.validators.reference import Reference

    src = fixture_dir(work_dirs["cache"], "qwen2_5_vl")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src)).eval()
    return Reference("qwen2_5_vl", model, src, image_params(src, model.config, 392, *_clip_mean_std()))


def hf_greedy(ref, prompt: str, image_paths, n: int) -> list[int]:
    """HF generate, greedy, stopping at EOS like the runtime (no min_new_tokens)."""
    from vlmforge.host.preprocess import load_image
    from vlmforge.host.prompt import mm_token_type_ids

    ids = torch.tensor([ref.prompt_ids(prompt, len(image_paths))])
    kw = {"mm_token_type_ids": torch.from_numpy(mm_token_type_ids(ids.numpy(), ref.config.image_token_id))}
    if image_paths:
        px = [ref.hf_pixels(load_image(p)) for p in image_paths]
        kw.update(pixel_values=torch.cat([p for p, _ in px]), image_grid_thw=torch.cat([g for _, g in px]))
    with torch.no_grad():
        out = ref.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = {502, 500}
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


# -- parity with HF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_generate_matches_hf_greedy(pipe, hf, images, n_images):
    prompt = "Describe this image in detail." if n_images else "Write a short poem about the sea."
    text = pipe.generate(prompt, images=images[:n_images], max_new_tokens=N_TOKENS)
    want = hf_greedy(hf, prompt, images[:n_images], N_TOKENS)
    assert text == pipe.tokenizer.decode(want, skip_special_tokens=True)
    stats = pipe.last_stats
    assert stats.images == n_images and stats.new_tokens >= 1 and stats.ttft_s > 0
    assert (stats.vision_s > 0) == (n_images > 0)


def test_stream_pieces_join_to_generate(pipe, images):
    pieces = list(pipe.stream("Describe this image in detail.", images=images[:1], max_new_tokens=N_TOKENS))
    assert len(pieces) > 1
    assert "".join(pieces) == pipe.generate("Describe this image in detail.", images=images[:1], max_new_tokens=N_TOKENS)


def test_text_stream_releases_whole_characters(pipe):
    text = "héllo wörld — 世界 🙂🙂 naïve"
    ids = pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters are split over several byte-level tokens
    stream = TextStream(pipe.tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_stops_before_stop_string_across_tokens(pipe):
    text = "one two three four five"
    ids = pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(pipe.tokenizer, stop=("thr", "xyz"))
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.done:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == "one two " and stream.done


def test_generate_stop_string_truncates_the_reply(pipe):
    full = pipe.generate("Write a short poem about the sea.", max_new_tokens=N_TOKENS)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = pipe.generate("Write a short poem about the sea.", max_new_tokens=N_TOKENS, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_sampling_is_reproducible_with_a_seed(pipe):
    kw = dict(max_new_tokens=N_TOKENS, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1)
    a = pipe.generate("Write a short poem about the sea.", seed=3, **kw)
    b = pipe.generate("Write a short poem about the sea.", seed=3, **kw)
    c = pipe.generate("Write a short poem about the sea.", seed=4, **kw)
    assert a == b and a != c


# -- batch and chat ------------------------------------------------------------------------------------------
def test_generate_batch_rows_equal_single_prompts(pipe, images):
    prompts = ["Describe this image in detail.", "Hi.", "Compare the two pictures."]
    imgs = [images[:1], [], images[1:3]]
    batch = pipe.generate_batch(prompts, images=imgs, max_new_tokens=N_TOKENS)
    assert pipe.last_stats.batch == 3 and pipe.last_stats.images == 3
    single = [pipe.generate(p, images=i, max_new_tokens=N_TOKENS) for p, i in zip(prompts, imgs)]
    assert batch == single


def test_chat_keeps_the_conversation_and_re_prefills(pipe, images):
    chat = pipe.chat(system="You are terse.")
    first = chat.send("Hello there.", max_new_tokens=6)
    second = chat.send("What is in this picture?", images=images[:1], max_new_tokens=6)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first and chat.messages[4]["content"] == second
    assert len(chat.images) == 1 and pipe.last_stats.images == 1
    # The same conversation rendered from scratch gives the same second reply.
    again = pipe.chat(system="You are terse.")
    again.messages = chat.messages[:3]
    assert again.send("What is in this picture?", images=images[:1], max_new_tokens=6) == second
    chat.reset()
    assert [m["role"] for m in chat.messages] == ["system"] and chat.images == []


def test_chat_keeps_a_reply_stopped_early(pipe):
    chat = pipe.chat()
    stream = chat.stream("Write a short poem about the sea.", max_new_tokens=40)
    got = next(stream)
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": got}
    assert chat.send("Again.", max_new_tokens=3) is not None and len(chat.messages) == 4


# -- bad input: InputError, nothing run ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_out_of_range_options_raise_input_error(pipe, kwargs, name):
    before = pipe.last_stats
    with pytest.raises(InputError, match=name):
        pipe.stream("Hi.", **kwargs)
    assert pipe.last_stats is before


def test_unreadable_image_raises_input_error_naming_it(pipe, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    before = pipe.last_stats
    with pytest.raises(InputError) as err:
        pipe.generate("Hi.", images=[str(bad)])
    assert str(bad) in str(err.value) and err.value.fix
    with pytest.raises(InputError, match="not found"):
        pipe.generate("Hi.", images=[str(tmp_path / "missing.png")])
    assert pipe.last_stats is before


def test_prompt_longer_than_context_raises_input_error(pipe, images):
    n = pipe.context_length // pipe.tokens_per_image + 1
    with pytest.raises(InputError, match="images take"):
        pipe.generate("Hi.", images=[images[0]] * n)
    with pytest.raises(InputError, match="exceeds the context length") as err:
        pipe.generate("Hi.", max_new_tokens=pipe.context_length)
    assert "lower max_new_tokens" in err.value.fix


# -- artifact verification --------------------------------------------------------------------------------------
@pytest.fixture()
def copy(art, tmp_path):
    d = tmp_path / "set"
    shutil.copytree(art, d)
    return d


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def test_load_rejects_a_tampered_file_naming_it_and_its_hash(copy):
    want = _manifest(copy)["files"]["decoder.onnx"]["sha256"]
    with open(copy / "decoder.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError) as err:
        Pipeline.load(copy)
    assert "decoder.onnx" in str(err.value) and want in str(err.value)


def test_load_rejects_a_missing_file(copy):
    os.remove(copy / "tokenizer.json")
    with pytest.raises(ArtifactError, match="missing: tokenizer.json"):
        Pipeline.load(copy)


def test_load_rejects_paths_outside_the_directory(copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copyfile(copy / "generation_config.json", outside)
    (copy / "generation_config.json").unlink()
    (copy / "generation_config.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="link or special file \\(not read\\): generation_config.json"):
        Pipeline.load(copy)
    (copy / "generation_config.json").unlink()
    shutil.copyfile(outside, copy / "generation_config.json")
    m = _manifest(copy)
    m["files"]["../outside.json"] = m["files"]["generation_config.json"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="schema at files: '../outside.json' does not match"):
        Pipeline.load(copy)


def test_load_rejects_a_newer_manifest_schema(copy):
    m = _manifest(copy)
    m["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="newer"):
        Pipeline.load(copy)


def test_load_rejects_unlisted_tokenizer_files(copy):
    (copy / "added_tokens.json").write_text("{}")
    with pytest.raises(ArtifactError, match="added_tokens.json"):
        Pipeline.load(copy)


# -- KV cache ----------------------------------------------------------------------------------------------------
def test_kv_modes_and_prefill_chunks_give_the_same_logits(pipe, images):
    prep = pipe.prepare([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                         images[:1], SamplingParams(), "test")
    runs = {}
    for mode, chunk in (("numpy", 10_000), ("ortvalue", 10_000), ("preallocated", 10_000), ("preallocated", 64)):
        state = prefill(pipe.engine, [prep.inputs], pipe.ids, max_new_tokens=6, kv_mode=mode, prefill_chunk=chunk)
        logits = [state.logits[0].copy()]
        for t in (5, 17, 42, 7, 99):
            logits.append(state.step([t])[0].copy())
        runs[(mode, chunk)] = np.stack(logits)
    base = runs[("numpy", 10_000)]
    for key in (("ortvalue", 10_000), ("preallocated", 10_000)):
        assert np.array_equal(runs[key], base), key
    assert np.max(np.abs(runs[("preallocated", 64)] - base)) < 1e-4


def test_a_loaded_cache_continues_like_the_original(pipe):
    from vlmforge.runtime.kv import BoundDecoder

    ids = np.asarray(pipe.tokenizer("a loaded cache", add_special_tokens=False)["input_ids"])
    state = prefill(pipe.engine, [PromptInputs(ids)], pipe.ids, max_new_tokens=3, kv_mode="numpy")
    cache = state.decoder.past()
    want = state.step([42])
    for mode in ("numpy", "ortvalue", "preallocated"):
        dec = BoundDecoder(pipe.engine.decoder, pipe.engine.layout, batch=1, capacity=len(ids) + 3, mode=mode)
        dec.load_past(cache)
        embeds, _ = pipe.engine.embed(np.array([[42]]), None, None)
        got = dec.run(embeds, state.mask, np.full((3, 1, 1), len(ids), np.int64) + state.deltas[None], None)
        assert np.array_equal(got[:, -1], want), mode
        assert all(np.array_equal(a, b) for a, b in zip(dec.past()[:2], state.decoder.past()[:2]))


def test_validator_loop_is_unchanged_by_the_kv_mode(pipe):
    ids = np.asarray(pipe.tokenizer("hello world", add_special_tokens=False)["input_ids"])
    out = {m: list(generate_tokens(pipe.engine, PromptInputs(ids), pipe.ids, max_new_tokens=5, choose=greedy,
                                   min_new_tokens=5, kv_mode=m)) for m in ("numpy", "preallocated")}
    assert [t for t, _ in out["numpy"]] == [t for t, _ in out["preallocated"]]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(out["numpy"], out["preallocated"]))


def test_pipeline_runs_qwen3_vl_with_deepstack(qwen3_384, images):
    """DeepStack features flow vision -> embedding -> decoder through the same loop the build's chain check
    compared with HF generate (recorded in the manifest)."""
    art = qwen3_384.directory
    manifest = json.loads((art / "manifest.json").read_text())
    assert all(c["passed"] for c in manifest["validation"]["checks"] if c["stage"] == "chain")
    q3 = Pipeline.load(art)
    assert q3.engine.layout.deepstack_layers > 0
    text = q3.generate("Describe this image in detail.", images=images[:1], max_new_tokens=N_TOKENS)
    prep = q3.prepare([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}],
                       images[:1], SamplingParams(), "test")
    tokens = [t for t, _ in generate_tokens(q3.engine, prep.inputs, q3.ids, max_new_tokens=N_TOKENS, choose=greedy)]
    tokens = [t for t in tokens if t not in q3.ids.eos]
    assert text == q3.tokenizer.decode(tokens, skip_special_tokens=True)
    assert q3.generate_batch(["Hi.", "Describe this image in detail."], images=[[], images[:1]], max_new_tokens=N_TOKENS)[1] == text


def test_host_binding_fast_and_public_paths_agree(pipe):
    """The pybind-level binding (the runtime's default) and onnxruntime's public wrappers bind the same
    memory: identical logits and presents from one decoder step."""
    from vlmforge.runtime.hostbind import HostBinding

    lay = pipe.engine.layout
    rng = np.random.default_rng(3)
    past = 7
    feeds = {"inputs_embeds": rng.standard_normal((1, 1, lay.hidden), dtype=np.float32),
             "attention_mask": np.ones((1, past + 1), np.int64),
             "position_ids": np.full((3, 1, 1), past, np.int64)}
    for i in range(lay.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((1, lay.kv_heads, past, lay.head_dim),
                                                                      dtype=np.float32)
    want = pipe.engine.decoder.session.run(None, feeds)
    names = [o.name for o in pipe.engine.decoder.session.get_outputs()]
    for fast in (True, False):
        host = HostBinding(pipe.engine.decoder.session, fast=fast)
        assert host.fast is fast
        outs = {n: np.full(w.shape, np.nan, w.dtype) for n, w in zip(names, want)}
        for name, arr in feeds.items():
            host.bind_input(name, host.value(arr))
        for name, arr in outs.items():
            host.bind_output(name, host.value(arr))
        host.run()
        for name, w in zip(names, want):
            assert np.array_equal(outs[name], w), (fast, name)


def test_decode_steps_after_a_run_of_another_shape(pipe):
    """A multi-token run() between decode steps rebinds the decoder's inputs_embeds; the next decode
    step must bind the embedding output buffer again (checked against the numpy mode)."""
    ids = np.asarray(pipe.tokenizer("mixed steps", add_special_tokens=False)["input_ids"])
    got = {}
    for mode in ("numpy", "preallocated"):
        state = prefill(pipe.engine, [PromptInputs(ids)], pipe.ids, max_new_tokens=8, kv_mode=mode)
        dec, n = state.decoder, len(ids)
        out = [dec.decode([5], np.ones((1, n + 1), np.int64), np.full((1, 1, 1), n))[0, -1].copy()]
        embeds, _ = pipe.engine.embed(np.array([[9, 11]]), None, None)
        pos = np.arange(n + 1, n + 3).reshape(1, 1, 2).repeat(3, 0)
        out.append(dec.run(embeds, np.ones((1, n + 3), np.int64), pos)[0, -1].copy())
        out.append(dec.decode([13], np.ones((1, n + 4), np.int64), np.full((1, 1, 1), n + 3))[0, -1].copy())
        got[mode] = np.stack(out)
    assert np.array_equal(got["numpy"], got["preallocated"])


def test_kv_modes_agree_with_deepstack(qwen3_384):
    """Qwen3-VL: the bound decode path (embedding outputs, deepstack_embeds included, written straight
    into the decoder's inputs) gives the numpy path's logits."""
    q3 = Pipeline.load(qwen3_384.directory)
    ids = np.asarray(q3.tokenizer("deepstack decode", add_special_tokens=False)["input_ids"])
    runs = {}
    for mode in ("numpy", "ortvalue", "preallocated"):
        state = prefill(q3.engine, [PromptInputs(ids)], q3.ids, max_new_tokens=5, kv_mode=mode)
        runs[mode] = np.stack([state.logits[0].copy()] + [state.step([t])[0].copy() for t in (3, 30, 300, 8)])
    assert np.array_equal(runs["numpy"], runs["preallocated"])
    assert np.array_equal(runs["numpy"], runs["ortvalue"])


def test_decode_past_the_capacity_is_refused(pipe):
    ids = np.asarray(pipe.tokenizer("full cache", add_special_tokens=False)["input_ids"])
    for mode in ("numpy", "preallocated"):
        state = prefill(pipe.engine, [PromptInputs(ids)], pipe.ids, max_new_tokens=1, kv_mode=mode)
        state.step([5])  # capacity = prompt + max_new_tokens: one decode step fits
        with pytest.raises(InputError, match="does not fit the KV cache"):
            state.step([6])


def _clip_mean_std():
    from vlmforge.registry import get_family

    image = get_family("qwen2_5_vl").image
    return image.mean, image.std
