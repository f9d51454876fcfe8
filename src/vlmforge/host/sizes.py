"""A fixed vision size: one side in pixels (a square, `672`) or height x width (`(672, 1008)`).

Pure and shared by the recipe, the build, the host preprocessing and the runtime. A square is kept as an int
everywhere (its set name, manifest and cache keys are those of the square sets made before HxW existed); a
non-square size is a (height, width) tuple in Python and a [height, width] list in JSON.
"""

from __future__ import annotations

from typing import Union

FixedSize = Union[int, tuple[int, int]]

# How an image whose size differs from the set's is fitted to it: stretched to height x width, as HF's
# processor and onnxruntime-genai's Resize (smart_resize 0) both do; recorded in a non-square set's manifest.
FIT_STRETCH = "stretch"


def size_hw(size) -> tuple[int, int]:
    """(height, width) of a fixed size: an int side, or a (height, width) tuple / [height, width] list."""
    if isinstance(size, (tuple, list)):
        h, w = size
        return int(h), int(w)
    return int(size), int(size)


def normalise(size) -> FixedSize:
    """An int for a square (also one given as [s, s]), else a (height, width) tuple."""
    h, w = size_hw(size)
    return h if h == w else (h, w)


def is_square(size) -> bool:
    h, w = size_hw(size)
    return h == w


def size_label(size) -> str:
    """`672` for a square, `672x1008` (height x width) otherwise: the set name's size part."""
    h, w = size_hw(size)
    return str(h) if h == w else f"{h}x{w}"


def size_json(size):
    """The manifest's `image_size`: an int for a square, [height, width] otherwise."""
    n = normalise(size)
    return n if isinstance(n, int) else list(n)


def size_from_json(value) -> FixedSize:
    """A manifest's `image_size` (int or [height, width]) back to a FixedSize."""
    return normalise(value)
