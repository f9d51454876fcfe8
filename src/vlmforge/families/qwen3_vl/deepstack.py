"""Running the HF Qwen3-VL model with DeepStack off: the reference for `deepstack: drop` artifact sets.

The drop variant's graphs are checked against HF computing exactly what they compute (vision features
only, nothing added to the decoder's hidden states), then measured against HF with DeepStack on; the
second number is the variant's real cost and goes into its manifest.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def deepstack_disabled(hf_model) -> Iterator[None]:
    """Scoped: with an empty `deepstack_visual_indexes` the HF vision tower collects no DeepStack features,
    `Qwen3VLModel.forward` builds an empty `deepstack_visual_embeds` list and the text model adds nothing.
    The instance attribute is restored on exit; the class and config are untouched."""
    visual = hf_model.model.visual
    saved = visual.deepstack_visual_indexes
    visual.deepstack_visual_indexes = []
    try:
        yield
    finally:
        visual.deepstack_visual_indexes = saved
