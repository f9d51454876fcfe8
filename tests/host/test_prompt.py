"""Image placeholder expansion and mm_token_type_ids vs the HF processor's own code."""

from __future__ import annotations

import types

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from vlmforge.core.errors import InputError
from vlmforge.fixtures import tokens as T
from vlmforge.host.prompt import expand_image_tokens, image_token_counts, mm_token_type_ids

VS, VE, IMG, VID = T.VISION_START_TOKEN_ID, T.VISION_END_TOKEN_ID, T.IMAGE_TOKEN_ID, T.VIDEO_TOKEN_ID


def hf_mm_token_type_ids(ids) -> np.ndarray:
    proc = types.SimpleNamespace(image_token_ids=[IMG], video_token_ids=[VID], audio_token_ids=[None])
    return np.array(ProcessorMixin.create_mm_token_type_ids(proc, [list(r) for r in ids]))


def test_expand_image_tokens_replaces_each_placeholder_in_order():
    ids = [1, VS, IMG, VE, 2, 3, VS, IMG, VE, 4]
    out = expand_image_tokens(ids, [4, 2], IMG, vision_start_token_id=VS)
    assert out == [1, VS, IMG, IMG, IMG, IMG, VE, 2, 3, VS, IMG, IMG, VE, 4]
    assert expand_image_tokens([5, 6], [], IMG) == [5, 6]


@pytest.mark.parametrize(("patch", "size"), [(14, 392), (14, 672), (16, 384), (16, 672)])
def test_image_token_counts_match_hf_processor(patch, size):
    proc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=size * size, max_pixels=size * size)
    hf_tokens = proc.get_number_of_image_patches(size, size) // 2**2  # Qwen2_5_VLProcessor's replacement count
    side = size // patch
    assert image_token_counts([[1, side, side]], 2) == [hf_tokens]
    assert image_token_counts(np.array([[1, side, side], [1, 4, 6]]), 2) == [hf_tokens, 6]


def test_expand_image_tokens_names_both_counts_when_mismatched():
    with pytest.raises(InputError, match=r"2 image placeholder\(s\) .* but 1 image\(s\)") as err:
        expand_image_tokens([VS, IMG, VE, VS, IMG, VE], [4], IMG)
    assert "fix:" in str(err.value)
    with pytest.raises(InputError, match=r"has 0 image placeholder\(s\) .* but 1 image"):
        expand_image_tokens([1, 2], [4], IMG)


def test_expand_image_tokens_rejects_placeholder_without_vision_start():
    with pytest.raises(InputError, match="does not follow a vision-start"):
        expand_image_tokens([1, IMG, VE], [4], IMG, vision_start_token_id=VS)
    assert expand_image_tokens([1, IMG, VE], [2], IMG) == [1, IMG, IMG, VE]  # unchecked without the id


def test_mm_token_type_ids_match_hf_processor():
    ids = np.array(
        [
            [T.PAD_TOKEN_ID, T.PAD_TOKEN_ID, 1, VS, IMG, IMG, IMG, VE, 2],
            [3, VS, IMG, IMG, VE, VS, VID, VE, 4],
        ]
    )
    ours = mm_token_type_ids(ids, IMG, VID)
    np.testing.assert_array_equal(ours, hf_mm_token_type_ids(ids))
    assert ours.dtype == np.int64 and ours.shape == ids.shape
    np.testing.assert_array_equal(mm_token_type_ids(ids[0].tolist(), IMG), hf_mm_token_type_ids([ids[0]])[0])
    assert mm_token_type_ids(ids, IMG)[1, 6] == 0  # video not marked without its id
