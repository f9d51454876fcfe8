"""Vision timings: a set's vision graph (onnxruntime, all cores) against the PyTorch tower
(`get_image_features`) on the same pixel values from HF's image processor, run alternately, best of
`repeats` each after a warm-up round, with the largest difference between their features.

- `bench_vision`: a fixed-size set at its one size (the mid model's 672 px target).
- `bench_vision_dynamic`: a `vision=dynamic` set (i) against the fixed-size graph of the same weights on the
  same square image (the graphs take the same grid there), and (ii) against the PyTorch tower at a range of
  image sizes, so the table shows how vision time grows with pixels.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from vlmforge.bench.measure import timed
from vlmforge.bench.variants import _image_processor, load_eager
from vlmforge.host.sizes import is_square, size_hw

# (width, height): squares, a landscape photo shape, and the 1344x896 the target names
DYNAMIC_SIZES = ((448, 448), (672, 672), (896, 672), (1344, 896))


def _torch_features(model, pixel_values, grid) -> np.ndarray:
    """The tower's image features as one [tokens, hidden] array (the output shape differs by family and
    transformers version: a tensor, a tuple of per-image tensors, or an output with pooler_output)."""
    import torch

    ref = model.model.get_image_features(pixel_values, grid)
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    if isinstance(ref, (list, tuple)) and ref and isinstance(ref[0], (list, tuple)):
        ref = ref[0]  # (features, deepstack) of Qwen3-VL
    ref = torch.cat(list(ref), 0) if isinstance(ref, (list, tuple)) else ref
    return ref.float().numpy()


def _best_ms(calls: dict, repeats: int) -> dict:
    """{name: best ms} of each callable, called in turn, `repeats` rounds after one warm-up round."""
    times: dict = {name: [] for name in calls}
    for i in range(repeats + 1):
        for name, call in calls.items():
            t = timed(call)
            if i:
                times[name].append(t)
    return {name: min(ts) * 1e3 for name, ts in times.items()}


def _pixels(proc, image, min_pixels: int | None = None, max_pixels: int | None = None):
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels} if min_pixels else None
    px = proc(images=[image], return_tensors="pt", **({"size": size} if size else {}))
    return px["pixel_values"], px["image_grid_thw"]


def bench_vision(directory: Path, source: Path, image: str, repeats: int) -> dict:
    """A fixed-size set's vision graph against the PyTorch tower at the set's size."""
    import torch

    from vlmforge.artifact.manifest import read_manifest
    from vlmforge.host.preprocess import load_image
    from vlmforge.runtime.engine import Graph

    size = read_manifest(directory)["components"]["vision"]["image_size"]
    h, w = size_hw(size)  # a side or [height, width] (the manifest's image_size)
    pv, grid = _pixels(_image_processor(source), load_image(image).resize((w, h)), h * w, h * w)
    model = load_eager(source)
    graph = Graph(directory / "vision.onnx")
    feeds = {"pixel_values": pv.numpy(), "image_grid_thw": grid.numpy()}
    with torch.inference_mode():
        ms = _best_ms({"onnxruntime": lambda: graph.run(feeds),
                       "pytorch": lambda: model.model.get_image_features(pv, grid)}, repeats)
        diff = float(np.max(np.abs(graph.run(feeds)["image_features"] - _torch_features(model, pv, grid))))
    del model, graph
    gc.collect()
    return {"image_size": size, "onnxruntime_ms": ms["onnxruntime"], "pytorch_ms": ms["pytorch"],
            "ratio": ms["pytorch"] / ms["onnxruntime"], "max_abs_diff": diff}


def bench_vision_dynamic(dynamic: Path, fixed: Path, source: Path, repeats: int, sizes=DYNAMIC_SIZES) -> dict:
    """{"versus_fixed": the dynamic and fixed graphs on one square image of the fixed set's size,
    "sizes": [the dynamic graph against the PyTorch tower per (width, height) in `sizes`]}. The dynamic set's
    own pixel budget (its manifest) preprocesses every image, as its runtime does."""
    import torch

    from vlmforge.artifact.manifest import read_manifest
    from vlmforge.fixtures.images import sample_image
    from vlmforge.runtime.engine import Graph

    budget = read_manifest(dynamic)["components"]["vision"]["preprocess"]
    side = read_manifest(fixed)["components"]["vision"]["image_size"]
    if not is_square(side):
        raise ValueError(f"bench_vision_dynamic compares with a square fixed set, got {side}")
    proc = _image_processor(source)
    model = load_eager(source)
    dyn, fix = Graph(dynamic / "vision.onnx"), Graph(fixed / "vision.onnx")
    out: dict = {"min_pixels": budget["min_pixels"], "max_pixels": budget["max_pixels"], "sizes": []}
    with torch.inference_mode():
        pv, grid = _pixels(proc, sample_image(3, size=(side, side)), budget["min_pixels"], budget["max_pixels"])
        feeds = {"pixel_values": pv.numpy(), "image_grid_thw": grid.numpy()}
        ms = _best_ms({"fixed": lambda: fix.run(feeds), "dynamic": lambda: dyn.run(feeds)}, repeats)
        diff = np.abs(dyn.run(feeds)["image_features"] - fix.run(feeds)["image_features"]).max()
        out["versus_fixed"] = {"image_size": side, "fixed_ms": ms["fixed"], "dynamic_ms": ms["dynamic"],
                               "ratio": ms["dynamic"] / ms["fixed"], "max_abs_diff": float(diff)}
        for width, height in sizes:
            pv, grid = _pixels(proc, sample_image(4, size=(width, height)), budget["min_pixels"], budget["max_pixels"])
            feeds = {"pixel_values": pv.numpy(), "image_grid_thw": grid.numpy()}
            ms = _best_ms({"dynamic": lambda f=feeds: dyn.run(f),
                           "pytorch": lambda p=pv, g=grid: model.model.get_image_features(p, g)}, repeats)
            diff = np.abs(dyn.run(feeds)["image_features"] - _torch_features(model, pv, grid)).max()
            out["sizes"].append({"image": [width, height], "grid_thw": grid[0].tolist(), "patches": int(pv.shape[0]),
                                 "dynamic_ms": ms["dynamic"], "pytorch_ms": ms["pytorch"],
                                 "ratio_pytorch_over_dynamic": ms["pytorch"] / ms["dynamic"],
                                 "max_abs_diff": float(diff)})
    del model, dyn, fix
    gc.collect()
    return out
