"""`vlmforge export-js`: the layout transformers.js loads, run in Node (js/, `make js-setup`) against HF generate.

The image is exactly the set's fixed size, so HF's processor (the checkpoint's own pixel bounds) and
transformers.js's (the layout's, pinned to the fixed grid) both leave it unresized: the two pipelines see
the same pixels, the same prompt ids and must give the same greedy tokens.
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


def run_node(layout: Path, image: Path, n: int = N_TOKENS) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail("Node 18+ and js/node_modules are needed: run `make js-setup` (make test does)")
    return subprocess.run([node, str(JS / "greedy.mjs"), str(layout), "--image", str(image), "--prompt", PROMPT,
                           "--tokens", str(n), "--min-tokens", str(n)], capture_output=True, text=True, timeout=300)


def node_greedy(layout: Path, image: Path, n: int = N_TOKENS) -> dict:
    proc = run_node(layout, image, n)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def hf_greedy(family_key: str, cache: Path, image: Path, n: int = N_TOKENS, deepstack_off: bool = False) -> tuple[list, list]:
    """(prompt ids, new tokens) of HF generate on the tiny checkpoint, HF's tokenizer, chat template and image
    processor with the checkpoint's own preprocessor config."""
    import contextlib

    import transformers
    from PIL import Image

    from vlmforge.host.prompt import expand_image_tokens, mm_token_type_ids
    from vlmforge.registry import get_family
    from vlmforge.source import fixture_dir

    family = get_family(family_key)
    src = str(fixture_dir(cache, family_key))
    model = getattr(transformers, family.hf_class).from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    proc = getattr(transformers, family.image.processor_class).from_pretrained(src)
    px = proc(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    merge = model.config.vision_config.spatial_merge_size
    n_img = int(px["image_grid_thw"][0].prod()) // merge**2
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                   add_generation_prompt=True, tokenize=False)
    ids = expand_image_tokens(tok(text, add_special_tokens=False)["input_ids"], [n_img], model.config.image_token_id,
                              vision_start_token_id=model.config.vision_start_token_id)
    t = torch.tensor([ids])
    off = family.deepstack_off(model) if deepstack_off else contextlib.nullcontext()
    with torch.no_grad(), off:
        out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=px["pixel_values"],
                             image_grid_thw=px["image_grid_thw"], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             mm_token_type_ids=torch.from_numpy(mm_token_type_ids(t.numpy(), model.config.image_token_id)))
    return ids, out[0, len(ids):].tolist()


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
