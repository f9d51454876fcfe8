"""`vlmforge export-js`: the layout transformers.js loads, run in Node (js/, `make js-setup`) against HF generate.

Fixed-size sets: the image is exactly the set's fixed size, so HF's processor (the checkpoint's own pixel
bounds) and transformers.js's (the layout's, pinned to the fixed grid) both leave it unresized: the two
pipelines see the same pixels, the same prompt ids and must give the same greedy tokens.

vision=dynamic sets: HF's processor and transformers.js's pick the same grid (both smart_resize within the
set's pixel budget) for the sizes here, and an image already on that grid is not resized by either: same
pixels, same tokens. An image that needs resizing is resized by transformers.js's own code (sharp's affine
bicubic in Node), not PIL's: the grid and the prompt are HF's, the pixels close but not equal (measured here,
tokens then may differ: README).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vlmforge.artifact.js_graphs import MAX_IR_VERSION, write_relocated
from vlmforge.artifact.transformers_js import MARK, export_js
from vlmforge.core.errors import ArtifactError
from vlmforge.fixtures.images import sample_image

REPO = Path(__file__).resolve().parents[2]
JS = REPO / "js"
PROMPT = "Describe this image in detail."
N_TOKENS = 12


def run_node(layout: Path, images, n: int = N_TOKENS, prompt: str = PROMPT, pixels: Path | None = None
             ) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail("Node 18+ and js/node_modules are needed: run `make js-setup` (make test does)")
    images = [images] if isinstance(images, (str, Path)) else list(images)
    args = [node, str(JS / "greedy.mjs"), str(layout), "--prompt", prompt, "--tokens", str(n), "--min-tokens", str(n)]
    for image in images:
        args += ["--image", str(image)]
    if pixels is not None:
        args += ["--pixels", str(pixels)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def node_greedy(layout: Path, images, n: int = N_TOKENS, prompt: str = PROMPT, pixels: Path | None = None) -> dict:
    proc = run_node(layout, images, n, prompt, pixels)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def hf_greedy(family_key: str, cache: Path, images, n: int = N_TOKENS, deepstack_off: bool = False,
              prompt: str = PROMPT) -> tuple[list, list]:
    """(prompt ids, new tokens) of HF generate on the tiny checkpoint, HF's tokenizer, chat template and image
    processor with the checkpoint's own preprocessor config, on the original files (several: one call)."""
    ids, tokens, _ = hf_run(family_key, cache, images, n, deepstack_off, prompt)
    return ids, tokens


def hf_run(family_key: str, cache: Path, images, n: int = N_TOKENS, deepstack_off: bool = False,
           prompt: str = PROMPT) -> tuple[list, list, dict]:
    """hf_greedy, and HF's processor outputs (pixel_values as numpy, image_grid_thw as a list)."""
    import contextlib

    import transformers
    from PIL import Image

    from vlmforge.host.prompt import expand_image_tokens, mm_token_type_ids
    from vlmforge.registry import get_family
    from vlmforge.source import fixture_dir

    images = [images] if isinstance(images, (str, Path)) else list(images)
    family = get_family(family_key)
    src = str(fixture_dir(cache, family_key))
    model = _hf_model(family.hf_class, src)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    merge = model.config.vision_config.spatial_merge_size
    kw, counts, seen = {}, [], {}
    if images:
        proc = getattr(transformers, family.image.processor_class).from_pretrained(src)
        px = proc(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
        kw = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
        counts = [int(g.prod()) // merge**2 for g in px["image_grid_thw"]]
        seen = {"pixel_values": px["pixel_values"].float().numpy(), "image_grid_thw": px["image_grid_thw"].tolist()}
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = expand_image_tokens(tok(text, add_special_tokens=False)["input_ids"], counts, model.config.image_token_id,
                              vision_start_token_id=model.config.vision_start_token_id)
    t = torch.tensor([ids])
    off = family.deepstack_off(model) if deepstack_off else contextlib.nullcontext()
    with torch.no_grad(), off:
        out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, **kw,
                             mm_token_type_ids=torch.from_numpy(mm_token_type_ids(t.numpy(), model.config.image_token_id)))
    return ids, out[0, len(ids):].tolist(), seen


_MODELS: dict = {}


def _hf_model(hf_class: str, src: str):
    """One HF model per checkpoint for the module (loading it is most of an HF run on the tiny fixtures)."""
    import transformers

    if src not in _MODELS:
        _MODELS[src] = getattr(transformers, hf_class).from_pretrained(src).eval()
    return _MODELS[src]


def _image(tmp: Path, manifest: dict) -> Path:
    _, gh, gw = manifest["components"]["vision"]["grid_thw"]
    p = manifest["components"]["vision"]["preprocess"]["patch_size"]
    path = tmp / "image.png"
    sample_image(11, size=(gw * p, gh * p)).save(path)  # (width, height): exactly the fixed grid
    return path


@pytest.fixture(scope="module")
def q25_layout(qwen25_392, tmp_path_factory):
    return export_js(qwen25_392.directory, tmp_path_factory.mktemp("tjs") / "tiny-q25")


def _manifest(set_dir: Path) -> dict:
    return json.loads((set_dir / "manifest.json").read_text())


# -- the layout --------------------------------------------------------------------------------------------
def test_layout_has_the_files_transformers_js_loads(q25_layout):
    cfg = json.loads((q25_layout / "config.json").read_text())
    tjs = cfg["transformers.js_config"]
    assert tjs["dtype"] == {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder_model_merged": "fp32"}
    for name in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        assert (q25_layout / "onnx" / f"{name}.onnx").is_file()
        chunks = tjs["use_external_data_format"].get(f"{name}.onnx", 0)
        assert (q25_layout / "onnx" / f"{name}.onnx_data").is_file() == (chunks == 1)
    assert tjs["use_external_data_format"]["embed_tokens.onnx"] == 1  # the table is always external (streamed)
    mark = json.loads((q25_layout / MARK).read_text())
    assert sorted(mark["files"]) == sorted(p.relative_to(q25_layout).as_posix() for p in q25_layout.rglob("*")
                                           if p.is_file() and p.name != MARK)
    pp = json.loads((q25_layout / "preprocessor_config.json").read_text())
    assert pp["min_pixels"] == pp["max_pixels"] == 392 * 392


def test_embed_tokens_equals_the_sets_embedding_on_text(q25_layout, qwen25_392):
    import onnx

    model = onnx.load(str(q25_layout / "onnx" / "embed_tokens.onnx"), load_external_data=False)
    assert model.ir_version <= MAX_IR_VERSION and [n.op_type for n in model.graph.node] == ["Gather"]
    ids = np.array([[1, 5, 77, 300, 511], [0, 2, 3, 4, 9]], np.int64)
    got = ort.InferenceSession(str(q25_layout / "onnx" / "embed_tokens.onnx")).run(None, {"input_ids": ids})[0]
    full = ort.InferenceSession(str(qwen25_392.directory / "embedding.onnx"))
    want = full.run(None, {"input_ids": ids, "image_features": np.zeros((0, got.shape[-1]), np.float32)})[0]
    assert got.shape == (2, 5, 64) and np.array_equal(got, want)


def test_relocated_graph_reads_renamed_external_data(qwen25_392, tmp_path):
    """A graph whose weights are external (the large sets) keeps its outputs after its data file is renamed."""
    import onnx

    from vlmforge.core.hashing import sha256_file

    root = tmp_path / "set"
    root.mkdir()
    model = onnx.load(str(qwen25_392.directory / "embedding.onnx"))
    onnx.save_model(model, str(root / "embedding.onnx"), save_as_external_data=True, location="embedding.onnx.data",
                    size_threshold=1024)  # as the build saves large graphs
    data = root / "embedding.onnx.data"
    expected = {"embedding.onnx.data": {"sha256": sha256_file(data), "bytes": data.stat().st_size}}
    out = write_relocated(root / "embedding.onnx", root, tmp_path / "out" / "e.onnx", "test", expected)
    assert [p.name for p in out.data] == ["e.onnx_data"]
    data.rename(root / "moved")  # the relocated graph must not read the old file
    ids = np.array([[506, 7, 506]], np.int64)
    feats = np.arange(128, dtype=np.float32).reshape(2, 64)
    got = ort.InferenceSession(str(out.path)).run(None, {"input_ids": ids, "image_features": feats})[0]
    want = ort.InferenceSession(str(qwen25_392.directory / "embedding.onnx")).run(
        None, {"input_ids": ids, "image_features": feats})[0]
    assert np.array_equal(got, want)


# -- transformers.js against HF ----------------------------------------------------------------------------
def test_transformers_js_greedy_tokens_match_hf(q25_layout, qwen25_392, work_dirs, tmp_path):
    image = _image(tmp_path, _manifest(qwen25_392.directory))
    js = node_greedy(q25_layout, image)
    ids, want = hf_greedy("qwen2_5_vl", work_dirs["cache"], image)
    assert js["image_grid_thw"] == [[1, 28, 28]]
    assert js["prompt_tokens"] == ids
    assert len(want) == N_TOKENS and js["new_tokens"] == want


def test_an_image_off_the_fixed_grid_is_named_not_an_onnxruntime_crash(q25_layout, tmp_path):
    image = tmp_path / "wide.png"
    sample_image(3, size=(500, 333)).save(image)
    proc = run_node(q25_layout, image, 2)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "resized to 308x476 (height x width)" in proc.stderr and "takes 392x392" in proc.stderr


def test_deepstack_dropped_set_matches_hf_without_deepstack(qwen3_384_drop, work_dirs, tmp_path):
    layout = export_js(qwen3_384_drop.directory, tmp_path / "q3")
    image = _image(tmp_path, _manifest(qwen3_384_drop.directory))
    js = node_greedy(layout, image)
    ids, want = hf_greedy("qwen3_vl", work_dirs["cache"], image, deepstack_off=True)
    assert js["prompt_tokens"] == ids and js["new_tokens"] == want


# -- refusals ----------------------------------------------------------------------------------------------
def test_refuses_a_set_that_keeps_deepstack(qwen3_384, tmp_path):
    with pytest.raises(ArtifactError, match="deepstack_embeds") as err:
        export_js(qwen3_384.directory, tmp_path / "out")
    assert "model.deepstack=drop" in err.value.fix
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_refuses_a_foreign_non_empty_out_with_exit_2(qwen25_392, tmp_path, capsys):
    from vlmforge.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export-js", str(qwen25_392.directory), str(out)]) == 2
    assert "not a layout written by `vlmforge export-js`" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_rewrites_its_own_layout_but_not_one_with_foreign_files(qwen25_392, tmp_path):
    out = export_js(qwen25_392.directory, tmp_path / "out")
    before = (out / MARK).read_bytes()
    assert export_js(qwen25_392.directory, out) == out and (out / MARK).read_bytes() == before
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not a layout written"):
        export_js(qwen25_392.directory, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_refuses_a_tampered_set(qwen25_392, tmp_path):
    bad = tmp_path / "set"
    shutil.copytree(qwen25_392.directory, bad)
    with open(bad / "decoder.onnx", "r+b") as f:
        f.seek(os.path.getsize(bad / "decoder.onnx") // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="changed .sha256 differs.: decoder.onnx"):
        export_js(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- vision=dynamic sets -----------------------------------------------------------------------------------------
def _images(tmp: Path, sizes, seed: int = 60) -> list[Path]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp / f"img{seed + i}-{size[0]}x{size[1]}.png"
        sample_image(seed + i, size=size).save(path)  # (width, height)
        out.append(path)
    return out


def _pixels(path: Path, shape) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").reshape(shape)


@pytest.fixture(scope="module")
def q25_dynamic_layout(qwen25_dynamic, tmp_path_factory):
    return export_js(qwen25_dynamic.directory, tmp_path_factory.mktemp("tjs-dyn") / "tiny-q25-dynamic")


def test_dynamic_layout_keeps_the_sets_pixel_budget(q25_dynamic_layout, qwen25_dynamic):
    pp = _manifest(qwen25_dynamic.directory)["components"]["vision"]["preprocess"]
    cfg = json.loads((q25_dynamic_layout / "preprocessor_config.json").read_text())
    assert (cfg["min_pixels"], cfg["max_pixels"]) == (pp["min_pixels"], pp["max_pixels"])
    assert cfg["size"] == {"shortest_edge": pp["min_pixels"], "longest_edge": pp["max_pixels"]}
    mark = json.loads((q25_dynamic_layout / MARK).read_text())["vision"]
    differences = mark.pop("known_differences")
    assert mark == {"component": "vision", "min_pixels": pp["min_pixels"], "max_pixels": pp["max_pixels"],
                    "fixed_hw": None}
    assert [d.split(":")[0] for d in differences] == ["grid", "grid", "pixels"] and "(e.g. 70, 350 px)" in differences[0]


# On the grid already (no resize by either side): a landscape, a portrait beside a square in one prompt, and text
# alone (that one needs greedy.mjs's fix of transformers.js 4.3.2's text-only rope delta).
ON_GRID = {"448x308": [(448, 308)], "308x616+392x392": [(308, 616), (392, 392)], "text": []}


@pytest.mark.parametrize("case", sorted(ON_GRID))
def test_dynamic_layout_matches_hf_on_images_already_on_the_grid(q25_dynamic_layout, work_dirs, tmp_path, case):
    images = _images(tmp_path, ON_GRID[case])
    prompt = PROMPT if images else "Write a short poem about the sea."
    ids, want, hf = hf_run("qwen2_5_vl", work_dirs["cache"], images, prompt=prompt)
    js = node_greedy(q25_dynamic_layout, images, prompt=prompt, pixels=tmp_path / "pv.bin")
    assert js["image_grid_thw"] == hf.get("image_grid_thw", [])
    if images:
        got = _pixels(tmp_path / "pv.bin", hf["pixel_values"].shape)
        assert np.max(np.abs(got - hf["pixel_values"])) < 1e-5
    assert js["prompt_tokens"] == ids
    assert len(want) == N_TOKENS and js["new_tokens"] == want


@pytest.mark.parametrize("sizes", [[(451, 300)], [(300, 620)]], ids=["451x300", "300x620"])
def test_dynamic_layout_resizes_to_hfs_grid_with_its_own_resampling(q25_dynamic_layout, work_dirs, tmp_path, sizes):
    """The grid, the prompt ids and the image-token count are HF's; the pixels are transformers.js's resize
    (sharp's affine bicubic), not PIL's: close (measured max 0.36 normalised) but not equal."""
    images = _images(tmp_path, sizes)
    ids, _, hf = hf_run("qwen2_5_vl", work_dirs["cache"], images, n=1)
    js = node_greedy(q25_dynamic_layout, images, n=1, pixels=tmp_path / "pv.bin")
    assert js["image_grid_thw"] == hf["image_grid_thw"] and js["prompt_tokens"] == ids
    diff = np.abs(_pixels(tmp_path / "pv.bin", hf["pixel_values"].shape) - hf["pixel_values"])
    assert 1e-3 < diff.max() < 0.5 and diff.mean() < 0.02


@pytest.fixture(scope="module")
def q3_dynamic_layout(qwen3_dynamic_drop, tmp_path_factory):
    return export_js(qwen3_dynamic_drop.directory, tmp_path_factory.mktemp("tjs-q3-dyn") / "tiny-q3-dynamic")


def test_dynamic_qwen3_vl_layout_without_deepstack_matches_hf(q3_dynamic_layout, work_dirs, tmp_path):
    """transformers.js runs qwen3_vl as its Qwen2.5-VL class (models/qwen3_vl: no DeepStack path); a
    non-square image on Qwen3-VL's 32 px grid."""
    images = _images(tmp_path, [(448, 288)])
    ids, want = hf_greedy("qwen3_vl", work_dirs["cache"], images, deepstack_off=True)
    js = node_greedy(q3_dynamic_layout, images)
    assert js["image_grid_thw"] == [[1, 18, 28]]
    assert js["prompt_tokens"] == ids and js["new_tokens"] == want
