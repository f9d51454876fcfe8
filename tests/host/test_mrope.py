"""MRoPE position ids vs HF `get_rope_index` and vs the position ids HF `generate` feeds its decoder."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
from transformers.processing_utils import ProcessorMixin

from vlmforge.core.errors import InputError
from vlmforge.families.qwen2_5_vl.fixture import tiny_config as qwen2_5_vl_config
from vlmforge.families.qwen3_vl.fixture import tiny_config as qwen3_vl_config
from vlmforge.fixtures import tokens as T
from vlmforge.host.mrope import decode_position_ids, rope_index

FAMILIES = {
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, qwen3_vl_config),
}
MERGE = 2


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    cls, config = FAMILIES[request.param]
    torch.manual_seed(0)
    return request.param, cls(config()).eval()


def hf_mm_token_type_ids(ids: np.ndarray) -> torch.Tensor:
    """HF's own processor code (ProcessorMixin.create_mm_token_type_ids) on a stand-in processor."""
    proc = types.SimpleNamespace(
        image_token_ids=[T.IMAGE_TOKEN_ID], video_token_ids=[T.VIDEO_TOKEN_ID], audio_token_ids=[None]
    )
    return torch.tensor(ProcessorMixin.create_mm_token_type_ids(proc, ids.tolist()))


def image_block(grid) -> list[int]:
    n = int(np.prod(grid)) // MERGE**2
    return [T.VISION_START_TOKEN_ID] + [T.IMAGE_TOKEN_ID] * n + [T.VISION_END_TOKEN_ID]


def text(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 400, n).tolist()


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.full((len(rows), width), T.PAD_TOKEN_ID, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def ours(ids, mask, grids, family=None):
    """Our port; `family` is unused (image position ids do not depend on it) and kept to say which HF
    model the case is checked against."""
    return rope_index(
        ids,
        mask,
        grids,
        image_token_id=T.IMAGE_TOKEN_ID,
        vision_start_token_id=T.VISION_START_TOKEN_ID,
        spatial_merge_size=MERGE,
    )


def hf(model, ids, mask, grids):
    pos, deltas = model.model.get_rope_index(
        torch.tensor(ids),
        mm_token_type_ids=hf_mm_token_type_ids(ids),
        image_grid_thw=None if grids is None else torch.tensor(grids),
        attention_mask=None if mask is None else torch.tensor(mask),
    )
    return pos.numpy(), deltas.numpy()


def assert_same(model, ids, mask, grids, family):
    pos, deltas = ours(ids, mask, grids, family)
    hf_pos, hf_deltas = hf(model, ids, mask, grids)
    assert pos.dtype == np.int64 and deltas.dtype == np.int64
    assert pos.shape == (3, *ids.shape) and deltas.shape == (ids.shape[0], 1)
    np.testing.assert_array_equal(pos, hf_pos)
    np.testing.assert_array_equal(deltas, hf_deltas)
    return pos, deltas


def test_rope_index_matches_hf_when_one_image(family_model):
    family, model = family_model
    grids = np.array([[1, 4, 6]])
    ids = np.array([text(5, 1) + image_block(grids[0]) + text(7, 2)])
    pos, deltas = assert_same(model, ids, None, grids, family)
    assert deltas[0, 0] == 3 - 6  # a 2x3 merged image takes 6 tokens but advances positions by 3


def test_rope_index_matches_hf_when_two_non_square_images(family_model):
    family, model = family_model
    grids = np.array([[1, 4, 8], [1, 10, 2]])
    ids = np.array([text(3, 3) + image_block(grids[0]) + text(4, 4) + image_block(grids[1]) + text(6, 5)])
    assert_same(model, ids, None, grids, family)
    assert_same(model, ids, np.ones_like(ids), grids, family)


def test_rope_index_matches_hf_when_left_padded_batch(family_model):
    family, model = family_model
    grids = np.array([[1, 6, 4]])
    ids, mask = left_pad([text(4, 6) + image_block(grids[0]) + text(5, 7), text(6, 8)])
    pos, deltas = assert_same(model, ids, mask, grids, family)
    assert (pos[:, 1, mask[1] == 0] == 0).all() and deltas[1, 0] == 0


def test_rope_index_matches_hf_when_text_only(family_model):
    family, model = family_model
    ids = np.array([text(9, 9), text(9, 10)])
    pos, deltas = assert_same(model, ids, None, None, family)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(9), (3, 2, 9)))
    ids, mask = left_pad([text(9, 11), text(4, 12)])
    assert_same(model, ids, mask, None, family)


def capture_generate_positions(model, ids, mask, grids, steps=3):
    """Position ids HF generate hands its language model, per forward call ([4, B, S]; row 0 = text)."""
    patch = model.config.vision_config.patch_size
    n_patches = int(np.prod(grids, axis=-1).sum())
    caught = []

    def hook(_module, _args, kwargs):
        caught.append(kwargs["position_ids"].clone().numpy())

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                pixel_values=torch.randn(n_patches, 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(0)),
                image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=hf_mm_token_type_ids(ids),
                max_new_tokens=steps + 1,
                min_new_tokens=steps + 1,
                do_sample=False,
                pad_token_id=T.PAD_TOKEN_ID,
            )
    finally:
        handle.remove()
    assert len(caught) == steps + 1 and all(c.shape[0] == 4 for c in caught)
    return caught


def test_decode_position_ids_match_hf_generate_when_left_padded(family_model):
    family, model = family_model
    grids = np.array([[1, 4, 6], [1, 2, 8]])
    ids, mask = left_pad(
        [text(3, 13) + image_block(grids[0]) + text(5, 14), text(2, 15) + image_block(grids[1]) + text(2, 16), text(4, 17)]
    )
    caught = capture_generate_positions(model, ids, mask, grids)
    pos, deltas = ours(ids, mask, grids, family)
    np.testing.assert_array_equal(caught[0][1:], pos)
    for step, fed in enumerate(caught[1:], start=1):
        full_mask = np.concatenate([mask, np.ones((len(ids), step), dtype=np.int64)], axis=1)
        np.testing.assert_array_equal(fed[1:], decode_position_ids(deltas, attention_mask=full_mask))


def test_decode_position_ids_match_hf_generate_when_unpadded(family_model):
    family, model = family_model
    grids = np.array([[1, 8, 4]])
    ids = np.array([text(6, 18) + image_block(grids[0]) + text(3, 19)])
    caught = capture_generate_positions(model, ids, np.ones_like(ids), grids)
    _, deltas = ours(ids, None, grids, family)
    for step, fed in enumerate(caught[1:]):
        np.testing.assert_array_equal(fed[1:], decode_position_ids(deltas, past_len=ids.shape[1] + step))


def test_decode_matches_hf_forward_when_prompt_ends_with_image(family_model):
    """Edge case where HF disagrees with itself: `generate` continues each axis from its last value (+1),
    the model's own cached forward uses `rope_deltas` (all axes = max + 1). We follow the model's forward
    (also onnxruntime-genai's and transformers 4.x generate's rule); chat prompts always end with text."""
    family, model = family_model
    grids = np.array([[1, 4, 6]])
    ids = np.array([text(3, 20) + image_block(grids[0])[:-1]])  # ends on the last image token
    patch = model.config.vision_config.patch_size
    caught = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: caught.append(kw["position_ids"].clone().numpy()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.model.rope_deltas = None
            out = model(
                input_ids=torch.tensor(ids),
                pixel_values=torch.randn(24, 3 * 2 * patch * patch),
                image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=hf_mm_token_type_ids(ids),
                use_cache=True,
            )
            model(input_ids=torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True)
    finally:
        handle.remove()
    pos, deltas = ours(ids, None, grids, family)
    np.testing.assert_array_equal(caught[0], pos)
    np.testing.assert_array_equal(caught[1], decode_position_ids(deltas, past_len=ids.shape[1]))
    generate_rule = pos[:, :, -1:] + 1  # what generate would feed instead
    assert not np.array_equal(generate_rule, caught[1])


def test_rope_index_rejects_mismatched_images():
    grids = np.array([[1, 4, 6]])
    ids = np.array([text(3, 21) + image_block(grids[0])])
    with pytest.raises(InputError, match="2 images but input_ids hold 1"):
        ours(ids, None, np.array([[1, 4, 6], [1, 4, 6]]), "qwen2_5_vl")
    with pytest.raises(InputError, match="run of image tokens is 6 long"):
        ours(ids, None, np.array([[1, 4, 4]]), "qwen3_vl")
    with pytest.raises(InputError, match="do not follow a vision-start"):
        ours(np.array([[5] + [T.IMAGE_TOKEN_ID] * 6]), None, grids, "qwen3_vl")


def test_decode_position_ids_needs_exactly_one_length_source():
    with pytest.raises(InputError, match="exactly one"):
        decode_position_ids(np.zeros((1, 1), dtype=np.int64))
    out = decode_position_ids(np.array([[-3], [0]]), past_len=10, new_tokens=2)
    np.testing.assert_array_equal(out[0], [[7, 8], [10, 11]])
    assert out.shape == (3, 2, 2) and out.dtype == np.int64
