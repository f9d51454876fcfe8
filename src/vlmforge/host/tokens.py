"""End-of-sequence and padding ids, and left padding: one definition for the build, validators and runtime.

Checkpoints spread EOS over generation_config.json, the text config and the top-level config, as an int or
a list; every reader merges them the same way here (first source first, de-duplicated).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def eos_ids(*sources) -> tuple[int, ...]:
    """The EOS ids of `sources` (each None, an int or a list), in order, de-duplicated; may be empty."""
    out: list[int] = []
    for source in sources:
        for e in (source if isinstance(source, (list, tuple)) else [source]):
            if e is not None and int(e) not in out:
                out.append(int(e))
    return tuple(out)


def pad_id(candidate, eos: Sequence[int] = ()) -> int:
    """`candidate` if set, else the first EOS id, else 0 (what a model without a pad token pads with)."""
    if candidate is not None:
        return int(candidate)
    return int(eos[0]) if eos else 0


def left_pad(rows: Sequence[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids [B, S] and attention mask [B, S] (the padding side generation uses)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask
