"""The embedded tiny fixtures: tokenizer, images, checkpoint folders. Real objects, no mocks, no network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmforge.core.errors import InputError
from vlmforge.families.qwen2_5_vl import fixture as qwen2_5_vl_fixture
from vlmforge.families.qwen3_vl import fixture as qwen3_vl_fixture
from vlmforge.fixtures import tokens as T
from vlmforge.fixtures.checkpoint import file_digests, write_hf_folder
from vlmforge.fixtures.images import non_square_image, sample_image, write_sample_image
from vlmforge.fixtures.tokenizer import CHAT_TEMPLATE, build_tokenizer, save_tokenizer

# family -> (fixture module, model class name, fixed side, pixel_values shape at that side, patch size)
FAMILIES = {
    "qwen2_5_vl": (qwen2_5_vl_fixture, "Qwen2_5_VLForConditionalGeneration", 392, (784, 1176), 14),
    "qwen3_vl": (qwen3_vl_fixture, "Qwen3VLForConditionalGeneration", 384, (576, 1536), 16),
}

IMAGE_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this picture."}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each family written three times: seed 0 twice (determinism) and seed 1 once (seed sensitivity)."""
    root = tmp_path_factory.mktemp("fixtures")
    out = {}
    for family, (module, *_rest) in FAMILIES.items():
        out[family] = {
            "a": module.write_fixture(root / f"{family}-seed0-a", seed=0),
            "b": module.write_fixture(root / f"{family}-seed0-b", seed=0),
            "other": module.write_fixture(root / f"{family}-seed1", seed=1),
        }
    return out


def _image_inputs(folder: Path, side: int, tokenizer) -> dict:
    """Processor-equivalent inputs for one image + a question (the combined processor needs torchvision)."""
    from transformers import Qwen2VLImageProcessor

    pixels = Qwen2VLImageProcessor.from_pretrained(folder)(images=[sample_image(0, (side, side))], return_tensors="pt")
    n_tokens = int(pixels["image_grid_thw"].prod()) // 4
    text = tokenizer.apply_chat_template(IMAGE_PROMPT, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens), return_tensors="pt")
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": pixels["image_grid_thw"],
        "mm_token_type_ids": (enc.input_ids == T.IMAGE_TOKEN_ID).long(),
    }


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_match_tokens_module(tokenizer):
    for text, token_id in T.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id
        assert tokenizer.encode(text) == [token_id]
    assert tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 500
    assert len(tokenizer) == 508 <= T.VOCAB_SIZE
    assert tokenizer.eos_token_id == T.EOS_TOKEN_ID and tokenizer.pad_token_id == T.PAD_TOKEN_ID


def test_tokenizer_build_is_deterministic(tokenizer):
    assert build_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_round_trip_gives_same_ids(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world! The picture has 12 colours.\n<|im_start|>user\nhi<|im_end|>\n ünïcödé 日本語"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.decode(loaded(text).input_ids) == text
    assert len(loaded) == len(tokenizer)
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE == (tmp_path / "chat_template.jinja").read_text()
    assert loaded.apply_chat_template(IMAGE_PROMPT, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(IMAGE_PROMPT, tokenize=False, add_generation_prompt=True)
    )


def test_chat_template_renders_image_placeholders(tokenizer):
    rendered = tokenizer.apply_chat_template(IMAGE_PROMPT, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this picture.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered).input_ids
    assert ids.count(T.IMAGE_TOKEN_ID) == 1 and ids[ids.index(T.IMAGE_TOKEN_ID) - 1] == T.VISION_START_TOKEN_ID


def test_chat_template_keeps_given_system_and_string_content(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "No."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "Same?<|im_end|>\n"
        "<|im_start|>assistant\nNo.<|im_end|>\n"
    )


def test_chat_template_rejects_unknown_item_type(tokenizer):
    with pytest.raises(Exception, match="unsupported content item type audio"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], tokenize=False)


# ---------------------------------------------------------------- images


def test_sample_image_is_deterministic_and_seed_sensitive():
    a, b, c = sample_image(0), sample_image(0), sample_image(1)
    assert a.mode == "RGB" and a.size == (392, 392)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a, dtype=np.float64) - np.asarray(c, dtype=np.float64)).mean() > 20


def test_sample_image_modes_and_non_square(tmp_path):
    assert non_square_image(2).size == (500, 333)
    rgba = sample_image(3, (64, 48), mode="RGBA")
    alpha = np.asarray(rgba)[..., 3]
    assert rgba.mode == "RGBA" and alpha.min() < 128 < alpha.max()
    assert sample_image(3, (64, 48), mode="L").mode == "L"
    path = write_sample_image(tmp_path / "img.png", 4, (40, 30), mode="RGBA")
    from PIL import Image

    with Image.open(path) as loaded:
        assert np.array_equal(np.asarray(loaded), np.asarray(sample_image(4, (40, 30), mode="RGBA")))
    with pytest.raises(InputError, match="mode"):
        sample_image(0, mode="CMYK")


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_bytes_identical_for_same_seed_and_weights_differ_for_other_seed(written, family):
    a, b, other = (file_digests(written[family][k]) for k in ("a", "b", "other"))
    assert set(a) == {
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    }
    assert a == b
    assert set(other) == set(a) and other["model.safetensors"] != a["model.safetensors"]
    assert {k for k in a if a[k] != other[k]} == {"model.safetensors"}


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_loads_without_missing_keys_and_reproduces_in_memory_logits(written, family, tokenizer):
    import transformers

    module, class_name, side, _shape, _grid = FAMILIES[family]
    folder = written[family]["a"]
    loaded, info = getattr(transformers, class_name).from_pretrained(folder, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    if family == "qwen3_vl":
        assert loaded.config.tie_word_embeddings
        assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    inputs = _image_inputs(folder, side, tokenizer)
    with torch.no_grad():
        want = module.build_model(0)(**inputs).logits
        got = loaded(**inputs).logits
    assert torch.equal(got, want)
    assert want.std().item() > 1.0, "fixture logits are flat; greedy agreement would be a weak signal"


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_perturbation_is_real(family):
    model = FAMILIES[family][0].build_model(0)
    norms = biases = 0
    for name, param in model.named_parameters():
        if param.ndim != 1:
            continue
        if name.endswith("bias"):
            biases += 1
            assert not torch.any(param == 0), name
        else:
            norms += 1
            assert not torch.any(param == 1), name
            assert torch.all((param - 1).abs() <= 0.2), name
    assert norms > 0 and biases > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_image_processor_loads_from_fixture_and_keeps_fixed_sizes(written, family):
    from transformers import Qwen2VLImageProcessor

    _module, _cls, side, shape, patch = FAMILIES[family]
    proc = Qwen2VLImageProcessor.from_pretrained(written[family]["a"])
    out = proc(images=[sample_image(1, (side, side))], return_tensors="np")
    assert out["pixel_values"].shape == shape
    assert out["image_grid_thw"].tolist() == [[1, side // patch, side // patch]]
    out = proc(images=[sample_image(2, (672, 672))], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 672 // patch, 672 // patch]]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_runs_on_text_only(written, family, tokenizer):
    import transformers

    _module, class_name, *_ = FAMILIES[family]
    model = getattr(transformers, class_name).from_pretrained(written[family]["a"]).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is in the image?"}],
                                         tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    first = model.generate(input_ids=input_ids, max_new_tokens=6)
    again = model.generate(input_ids=input_ids, max_new_tokens=6)
    assert torch.equal(first, again)
    assert first.shape[1] > input_ids.shape[1] and torch.equal(first[:, : input_ids.shape[1]], input_ids)


def test_write_hf_folder_replaces_existing_folder_atomically(tmp_path, tokenizer):
    module = FAMILIES["qwen2_5_vl"][0]
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    write_hf_folder(module.build_model(0), tokenizer, module.image_processor_config(), target)
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temp folders left beside the checkpoint"
