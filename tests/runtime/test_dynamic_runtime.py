"""The vlmforge runtime on vision=dynamic sets (the session's one build per family): HF's own processing of
the original image files (no resizing by the test), token counts and MRoPE positions from each image's real
grid, several sizes in one prompt; greedy tokens identical to HF `generate`. A (pixel_values, grid) pair the
graph cannot take is an InputError before onnxruntime runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmforge.core.errors import InputError
from vlmforge.fixtures.images import sample_image
from vlmforge.host.preprocess import load_image
from vlmforge.runtime.loop import generate_tokens, greedy
from vlmforge.runtime.pipeline import Pipeline, SamplingParams, _user

N_TOKENS = 12
BUILDS = {"qwen2_5_vl": "qwen25_dynamic", "qwen3_vl": "qwen3_dynamic"}
# (width, height) of each image file of a prompt: aspect ratios other than the validation's, one prompt with
# two different sizes, and a text-only one
PROMPTS = {"wide 640x210": [(640, 210)], "odd 451x300": [(451, 300)], "tall 260x700": [(260, 700)],
           "two sizes": [(451, 300), (260, 700)], "text only": []}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def family(request, work_dirs):
    """(pipeline, HF reference) of one family's dynamic set."""
    from vlmforge.registry import get_family
    from vlmforge.source import fixture_dir
    from vlmforge.validators.reference import Reference
    import transformers

    report = request.getfixturevalue(BUILDS[request.param])
    pipe = Pipeline.load(report.directory)
    src = fixture_dir(work_dirs["cache"], request.param)
    model = getattr(transformers, get_family(request.param).hf_class).from_pretrained(str(src)).eval()
    return pipe, Reference(request.param, model, src, pipe.dynamic)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dynamic-images")
    out = {}
    for name, sizes in PROMPTS.items():
        out[name] = []
        for i, size in enumerate(sizes):
            path = d / f"{name.replace(' ', '_')}-{i}.png"
            sample_image(40 + i + len(out), size=size).save(path)
            out[name].append(str(path))
    return out


def hf_tokens(ref, prompt: str, paths: list[str]) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) of HF: its image processor on each original file, as many image tokens as
    its grid gives, HF's own MRoPE positions (generate)."""
    from vlmforge.validators.reference import grid_tokens

    if paths:
        px = [ref.hf_pixels(load_image(p)) for p in paths]
        pv, grids = torch.cat([p for p, _ in px]), torch.cat([g for _, g in px])
        counts = grid_tokens(grids.numpy(), ref.params.merge_size)
    else:
        pv = grids = counts = None
    ids = np.asarray([ref.prompt_ids(prompt, len(paths), counts)], np.int64)
    tokens, _ = ref.generate(ids, pv, grids, N_TOKENS)
    return ids[0].tolist(), tokens


@pytest.mark.parametrize("case", list(PROMPTS))
def test_runtime_matches_hf_generate_on_the_original_files(family, files, case):
    pipe, ref = family
    prompt = "Describe this image in detail." if PROMPTS[case] else "Write a short poem about the sea."
    paths = files[case]
    want_ids, want = hf_tokens(ref, prompt, paths)
    prepared = pipe.prepare([_user(prompt, len(paths))], paths, SamplingParams(max_new_tokens=N_TOKENS))
    assert prepared.prompt_ids.tolist() == want_ids  # image tokens per image from its own grid
    grids = [g.tolist()[0] for _, g in prepared.inputs.images]
    assert len({tuple(g) for g in grids}) == len(grids)  # every image kept its own grid
    got = [t for t, _ in generate_tokens(pipe.engine, prepared.inputs, pipe.ids, max_new_tokens=N_TOKENS,
                                         min_new_tokens=N_TOKENS, choose=greedy)]
    assert got == want


def test_generate_text_matches_hf(family, files):
    pipe, ref = family
    _, want = hf_tokens(ref, "Describe this image in detail.", files["two sizes"])
    text = pipe.generate("Describe this image in detail.", images=files["two sizes"], max_new_tokens=N_TOKENS)
    eos = set(pipe.ids.eos)
    want = want[: next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert text == pipe.tokenizer.decode(want, skip_special_tokens=True)
    assert pipe.last_stats.images == 2


def test_inconsistent_grid_is_an_input_error(family, files):
    pipe, _ = family
    pv, grid = pipe.image_patches(load_image(files["odd 451x300"][0]))
    merge = pipe.dynamic.merge_size
    bad = {"more patches than pixel rows": grid + np.array([[0, merge, 0]]),
           "h not a multiple of the merge size": grid + np.array([[0, 1, 0]]),
           "not [num_images, 3]": grid[:, :2]}
    for what, g in bad.items():
        with pytest.raises(InputError, match="image_grid_thw|pixel_values") as exc:
            pipe.engine.encode_image(pv, g)
        assert "fix:" in str(exc.value), what
    with pytest.raises(InputError, match="patch rows"):
        pipe.engine.encode_image(pv[:-4], grid)
    feats, _ = pipe.engine.encode_image(pv, grid)  # the consistent pair still runs
    assert feats.shape[0] == int(grid.prod()) // merge**2
