"""host.tokens: the one EOS/pad merge every reader uses, and left padding."""

from __future__ import annotations

import numpy as np

from vlmforge.host.tokens import eos_ids, left_pad, pad_id


def test_eos_ids_merge_sources_in_order_without_repeats():
    assert eos_ids([151645, 151643], 151645, None) == (151645, 151643)
    assert eos_ids(None, 7) == (7,) and eos_ids(None, None) == ()


def test_pad_falls_back_to_the_first_eos_then_zero():
    assert pad_id(3, (9,)) == 3 and pad_id(None, (9, 4)) == 9 and pad_id(None) == 0


def test_left_pad_pads_on_the_left_and_masks_the_padding():
    ids, mask = left_pad([np.array([5, 6, 7]), np.array([8])], pad=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    assert ids.dtype == mask.dtype == np.int64
