"""Non-square fixed sizes (vision.size=HxW): the recipe checks, the set a tiny Qwen2.5-VL HxW build makes
(name, manifest, validation on images of exactly H x W), and how the runtimes fit an image of another size
(stretched to H x W: vlmforge's runtime, its CLI note, and onnxruntime-genai's processor alike)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.conftest import RECIPES, compose
from vlmforge.artifact.manifest import validate_manifest, verify_dir
from vlmforge.build.publish_dir import artifact_dir
from vlmforge.cli import main
from vlmforge.config import resolve_image_size
from vlmforge.core.errors import ArtifactError, RecipeError
from vlmforge.fixtures.images import sample_image
from vlmforge.host.image import ImageParams
from vlmforge.host.preprocess import image_to_patches
from vlmforge.registry import get_family

H, W = 196, 336  # the tiny HxW set (SESSION_SETS qwen25_196x336): 196 is no multiple of the 112-px window
MAX_REL = 5e-5  # the FP32 bar, as for the square sets


# -- recipe ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "size", "want"), [
    ("qwen2_5_vl", "672x1008", (672, 1008)), ("qwen2_5_vl", "1008x672", (1008, 672)),
    ("qwen2_5_vl", " 196 X 336 ", (196, 336)), ("qwen2_5_vl", "672x672", 672), ("qwen2_5_vl", "672", 672),
    ("qwen2_5_vl", "small", 392), ("qwen3_vl", "672x1024", (672, 1024)), ("qwen3_vl", "large", 672)])
def test_resolve_image_size_reads_height_x_width(family, size, want):
    assert resolve_image_size(size, get_family(family), "test") == want


@pytest.mark.parametrize(("family", "size", "what", "fix"), [
    ("qwen2_5_vl", "670x1008", "got height 670", "use 672 or 644 for the height"),
    ("qwen2_5_vl", "672x1000", "got width 1000", "use 1008 or 980 for the width"),
    ("qwen3_vl", "672x1008", "got width 1008", "use 992 or 1024 for the width"),
    ("qwen2_5_vl", "0x672", "positive integer", "for the height"),
    ("qwen2_5_vl", "672x", "not HEIGHTxWIDTH", "height first"),
    ("qwen2_5_vl", "x672", "not HEIGHTxWIDTH", "height first"),
    ("qwen2_5_vl", "672x1008x3", "not HEIGHTxWIDTH", "height first"),
    ("qwen2_5_vl", "-28x56", "not HEIGHTxWIDTH", "height first"),
    ("qwen2_5_vl", "672 by 1008", "neither small, large", "HEIGHTxWIDTH")])
def test_resolve_image_size_names_the_bad_side_and_its_nearest_sizes(family, size, what, fix):
    with pytest.raises(RecipeError) as info:
        resolve_image_size(size, get_family(family), "recipe: vision.size")
    assert what in info.value.what and fix in info.value.fix and info.value.where == "recipe: vision.size"


@pytest.mark.parametrize("size", ["670x1008", "672x"])
def test_export_refuses_a_bad_hxw_with_exit_2_and_leaves_nothing(capsys, tmp_path, work_dirs, size):
    out = tmp_path / "out"
    code = main(["--recipes", str(RECIPES), "export", f"out_dir={out}", f"cache_dir={work_dirs['cache']}",
                 f"vision.size={size}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "RecipeError" in err and "fix:" in err
    assert not out.exists() or not list(out.rglob("*"))


def test_set_names_square_as_before_and_hxw_as_height_x_width():
    cfg = compose("model=tiny_qwen2_5_vl", "out_dir=/x")
    assert artifact_dir(cfg, 392).name == "fp32-392"
    assert artifact_dir(cfg, (196, 336)).name == "fp32-196x336"
    assert artifact_dir(cfg, None).name == "fp32-dynamic"


# -- preprocessing -----------------------------------------------------------------------------------------------------
def test_image_params_record_the_fit_only_for_non_square_sizes():
    square = ImageParams(392, 14, 2, 2, (0.5,) * 3, (0.5,) * 3)
    hxw = ImageParams((H, W), 14, 2, 2, (0.5,) * 3, (0.5,) * 3)
    assert "fit" not in square.to_json() and square.to_json()["size"] == 392  # a square set's manifest as before
    assert hxw.to_json()["size"] == [H, W] and hxw.to_json()["fit"] == "stretch"
    assert (hxw.tokens_per_image, hxw.grid_thw) == ((H // 28) * (W // 28), [1, H // 14, W // 14])
    assert hxw.hf_size == {"shortest_edge": H * W, "longest_edge": H * W}


def test_an_off_size_image_is_stretched_to_height_x_width():
    image = sample_image(5, size=(300, 300))  # square into a wide set
    got, grid = image_to_patches(image, size=(H, W), patch_size=14, temporal_patch_size=2, merge_size=2,
                                 mean=(0.5,) * 3, std=(0.5,) * 3)
    want, _ = image_to_patches(image.resize((W, H), Image.Resampling.BICUBIC), size=(H, W), patch_size=14,
                               temporal_patch_size=2, merge_size=2, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert grid.tolist() == [[1, H // 14, W // 14]] and got.shape == (H * W // 196, 1176)
    assert np.array_equal(got, want)


# -- the tiny HxW build ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(qwen25_196x336):
    return qwen25_196x336


def _manifest(report) -> dict:
    return json.loads((report.directory / "manifest.json").read_text())


def test_hxw_set_records_its_size_and_fit_and_verifies(report):
    assert report.passed and report.directory.name == f"fp32-{H}x{W}"
    m = _manifest(report)
    vision = m["components"]["vision"]
    assert vision["image_size"] == [H, W] and vision["grid_thw"] == [1, H // 14, W // 14]
    assert vision["tokens_per_image"] == (H // 28) * (W // 28)
    assert vision["preprocess"]["size"] == [H, W] and vision["preprocess"]["fit"] == "stretch"
    assert vision["inputs"][0]["shape"] == [(H // 14) * (W // 14), 1176]
    assert m["recipe"]["vision"] == {"size": f"{H}x{W}"}
    assert verify_dir(report.directory).ok
    resize = [t["operation"] for t in json.loads((report.directory / "processor_config.json").read_text())
              ["processor"]["transforms"] if t["operation"]["type"] == "Resize"][0]
    assert (resize["attrs"]["height"], resize["attrs"]["width"], resize["attrs"]["smart_resize"]) == (H, W, 0)


@pytest.mark.parametrize(("key", "value"), [("image_size", [H, W, 3]), ("image_size", [H, 0]), ("fit", "pad")])
def test_schema_refuses_a_malformed_hxw_vision(report, key, value):
    m = _manifest(report)
    target = m["components"]["vision"]["preprocess"] if key == "fit" else m["components"]["vision"]
    target[key] = value
    with pytest.raises(ArtifactError):
        validate_manifest(m, "manifest.json")


def test_hxw_validation_is_on_images_of_exactly_h_x_w_and_passes_the_fp32_bar(report):
    checks = report.checks
    pre = [c for c in checks if c.stage == "preprocess"]
    vision = [c for c in checks if c.stage == "vision" and c.metric == "max_rel"]
    chain = [c for c in checks if c.stage == "chain" and c.metric == "token_match"]
    # HF's processor (min = max = H*W pixels) keeps an H x W image as it is: the same pixels as ours, exactly
    assert len(pre) == 2 and all(c.value == 0 for c in pre)
    assert len(vision) == 2 and all(c.value <= MAX_REL for c in vision)
    assert len(chain) == 2 and all(c.value == 1 for c in chain)


@pytest.fixture(scope="module")
def pipe(report):
    from vlmforge.runtime.pipeline import Pipeline

    return Pipeline.load(report.directory)


def test_runtime_stretches_an_off_size_image_and_says_so(pipe, tmp_path, caplog, capsys):
    path = tmp_path / "tall.png"
    sample_image(7, size=(200, 500)).save(path)  # portrait into a landscape set
    stretched = tmp_path / "stretched.png"
    Image.open(path).convert("RGB").resize((W, H), Image.Resampling.BICUBIC).save(stretched)
    assert pipe.image_size == (H, W) and pipe.fit == "stretch"
    with caplog.at_level(logging.INFO, logger="vlmforge.runtime.pipeline"):
        got = pipe.generate("Describe it.", images=[str(path)], max_new_tokens=8)
    assert "image 200x500 (width x height) stretched to 336x196" in caplog.text and "fit=stretch" in caplog.text
    assert got == pipe.generate("Describe it.", images=[str(stretched)], max_new_tokens=8)
    assert pipe.fit_note(Image.open(stretched)) is None  # already the set's size: nothing to say
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlmforge.runtime.pipeline"):  # the CLI logs INFO to stderr
        code = main(["generate", str(pipe.directory), "--image", str(path), "--prompt", "Describe it.",
                     "--max-new-tokens", "8"])
    out, _ = capsys.readouterr()
    assert code == 0 and out == got + "\n"
    assert "image 200x500 (width x height) stretched to 336x196" in caplog.text
    assert "vision=dynamic set keeps the aspect ratio" in caplog.text


@pytest.fixture(scope="module")
def genai_model(report):
    og = pytest.importorskip("onnxruntime_genai")
    return og, og.Model(str(report.directory))


def test_genai_greedy_on_an_h_x_w_image_matches_hf_generate(report, genai_model, work_dirs, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tests.artifact.test_runtime_configs import genai_generate, hf_generate
    from vlmforge.host.image import image_params
    from vlmforge.source import fixture_dir
    from vlmforge.validators.reference import Reference

    _, model = genai_model
    src = fixture_dir(work_dirs["cache"], "qwen2_5_vl")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src)).eval()
    pp = _manifest(report)["components"]["vision"]["preprocess"]
    ref = Reference("qwen2_5_vl", hf, src, image_params(src, hf.config, (H, W), pp["mean"], pp["std"]))
    path = tmp_path / "exact.png"
    sample_image(8, size=(W, H)).save(path)  # exactly H x W: HF's processor keeps it as it is
    tokens, logits, _ = genai_generate(model, report.directory, "Describe this image in detail.", [str(path)], 12)
    want, want_logits = hf_generate(ref, "Describe this image in detail.", [str(path)], 12)
    assert tokens == want and np.max(np.abs(logits - want_logits)) < 1e-4


# onnxruntime-extensions' Resize (genai 0.18) differs from PIL's BICUBIC when an image's width grows while its
# height shrinks (up to ~0.3 in pixel_values; the square sets too: 300x450 into 392x392); every other case matches
WIDTH_UP_HEIGHT_DOWN = pytest.mark.xfail(strict=True, reason=(
    "onnxruntime-extensions (genai 0.18) resizes an image whose width is scaled up and height down differently "
    "from PIL/HF; downscaling, upscaling and height-up/width-down match"))


@pytest.mark.parametrize("size", [(W, H), (500, 500), (640, 360), (200, 100), (450, 300),
                                  pytest.param((300, 300), marks=WIDTH_UP_HEIGHT_DOWN)])
def test_genai_stretches_an_off_size_image_like_the_runtime(genai_model, pipe, tmp_path, size):
    og, model = genai_model
    path = tmp_path / "image.png"
    sample_image(9, size=size).save(path)
    got = model.create_multimodal_processor()("<|vision_start|><|image_pad|><|vision_end|>hi",
                                              images=og.Images.open(str(path)))
    want, grid = pipe.image_patches(Image.open(path))
    assert got["image_grid_thw"].as_numpy().tolist() == grid.tolist() == [[1, H // 14, W // 14]]
    assert np.max(np.abs(got["pixel_values"].as_numpy() - want)) < 1e-5


def test_task_examples_of_an_hxw_set_are_the_square_ones_stretched():
    from vlmforge.fixtures.task import heldout_examples
    from vlmforge.validators.task import task_examples

    square, hxw = heldout_examples(2, 96), task_examples(2, (64, 96))
    assert [ex.image.size for ex in hxw] == [(96, 64)] * 2
    assert [(ex.question, ex.answer) for ex in hxw] == [(ex.question, ex.answer) for ex in square]
    assert np.array_equal(np.asarray(hxw[0].image), np.asarray(square[0].image.resize((96, 64), Image.Resampling.BICUBIC)))
    assert [np.asarray(ex.image).tobytes() for ex in task_examples(2, 96)] == [np.asarray(ex.image).tobytes() for ex in square]


def test_user_validation_images_are_fitted_to_a_fixed_set_as_the_runtime_fits_them(tmp_path):
    from types import SimpleNamespace

    from vlmforge.build import validation_images

    paths = []
    for i, size in enumerate(((300, 450), (W, H), (500, 500))):
        paths.append(str(tmp_path / f"{i}.png"))
        sample_image(i, size=size).save(paths[-1])
    vcfg = SimpleNamespace(images=paths, image_seeds=[1])
    hxw = validation_images(vcfg, False, (H, W))
    assert [img.size for img in hxw] == [(W, H)] * 3
    assert np.array_equal(np.asarray(hxw[0]), np.asarray(Image.open(paths[0]).convert("RGB").resize((W, H), Image.Resampling.BICUBIC)))
    square = validation_images(vcfg, False, 392)  # a square into a square set: HF's processor resizes it alike
    assert [img.size for img in square] == [(392, 392), (392, 392), (500, 500)]
    assert [img.size for img in validation_images(vcfg, True)] == [(300, 450), (W, H), (500, 500)]  # dynamic: as given
