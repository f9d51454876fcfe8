"""The bounded-memory paths give the bytes of the in-memory ones, at small size.

- the export's save (`transforms.external.save_like_onnx`): the structure plus the exporter's data file, one
  tensor at a time -> the same `.onnx` and `.onnx.data` as loading every weight and `save_model`;
- the INT4 quantizer reading one weight at a time from the FP32 data file -> the same bytes as quantizing
  the loaded graph (default symmetric and asymmetric, HQQ, the embedding Gather, an lm_head kept float);
- the per-stage loader (`vlmforge.loading`) -> exactly the weights `from_pretrained` gives, for the stage's
  parameters only, from the checkpoint's own names or the hub's legacy names.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vlmforge.exporters import onnx_export
from vlmforge.transforms.external import load_structure, save_like_onnx


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name)}


def _export_torch(tmp: Path) -> Path:
    """A torch.onnx (dynamo) export with external data: large weights, a small bias, a constant."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).eval()
    out = tmp / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, 64),), str(out), dynamo=True, external_data=True, optimize=True,
                      opset_version=18, input_names=["x"], output_names=["y"])
    return out


@pytest.mark.parametrize("threshold", [0, 1 << 30])
def test_save_like_onnx_writes_the_bytes_of_load_and_save_model(tmp_path, monkeypatch, threshold):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", threshold)
    src = _export_torch(tmp_path)
    old, new = tmp_path / "old" / "stage.onnx", tmp_path / "new" / "stage.onnx"
    old.parent.mkdir(), new.parent.mkdir()
    onnx_export.save_model(onnx.load(str(src), load_external_data=True), old)
    save_like_onnx(onnx_export.normalize_model(load_structure(src)), src, new, threshold)
    want, got = _files(old), _files(new)
    assert list(got) == list(want) == (["stage.onnx", "stage.onnx.data"] if threshold == 0 else ["stage.onnx"])
    assert got == want
    if threshold == 0:  # both kinds of tensor occur: written to the data file, and kept inline (< 991 bytes)
        m = onnx.load(str(new), load_external_data=False)
        kinds = {t.data_location for t in m.graph.initializer}
        assert kinds == {TensorProto.DEFAULT, TensorProto.EXTERNAL}


def _int4_graph(out: Path) -> Path:
    """Two MatMuls (one with N = vocab: the lm_head), a K not a multiple of the block, an embedding Gather."""
    rng = np.random.default_rng(0)
    vocab, dim = 96, 64
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((dim, 48)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((48, 48)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((dim, vocab)).astype(np.float32), "head")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["e"], name="gather", axis=0),
             helper.make_node("MatMul", ["e", "w0"], ["h0"], name="mm0"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="mm2"),
             helper.make_node("MatMul", ["h0", "head"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab]),
                               helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["b", "s", 48])], inits)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_export.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), out)
    return out


CONFIGS = [
    dict(algorithm="default", block_size=32, symmetric=True, accuracy_level=4, quantize_lm_head=True,
         quantize_embedding=False),
    dict(algorithm="default", block_size=32, symmetric=False, accuracy_level=0, quantize_lm_head=False,
         quantize_embedding=True),
    dict(algorithm="hqq", block_size=32, symmetric=False, accuracy_level=4, quantize_lm_head=True,
         quantize_embedding=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default-sym", "default-asym-gather", "hqq"])
@pytest.mark.parametrize("threshold", [0, 1 << 30], ids=["external", "inline"])
def test_streaming_int4_writes_the_bytes_of_the_in_memory_quantizer(tmp_path, monkeypatch, cfg, threshold):
    from vlmforge.transforms.graph import load_graph
    from vlmforge.transforms.quantize_int4 import quantize_int4, quantize_model

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", threshold)
    cfg = SimpleNamespace(**cfg)
    src = _int4_graph(tmp_path / "fp32" / "decoder.onnx")
    assert (src.with_name("decoder.onnx.data").exists()) == (threshold == 0)
    old, new = tmp_path / "old" / "decoder.onnx", tmp_path / "new" / "decoder.onnx"
    old.parent.mkdir(), new.parent.mkdir()
    out, _ = quantize_model(load_graph(src), cfg, 96)  # the whole graph in memory: what the build did before
    onnx_export.save_model(out, old)
    record = quantize_int4(src, new, cfg, vocab=96)
    assert record["quantized_nodes"] >= 2 and "mm2" in record["kept_float"]
    assert ("lm_head" in record["kept_float"]) == (not cfg.quantize_lm_head)
    assert record["embedding_tables_quantized"] == int(cfg.quantize_embedding)
    assert _files(new) == _files(old)


def _source(checkpoint: str, family: str, cache: Path):
    from vlmforge.build import load_hf_config
    from vlmforge.source import open_source

    src = open_source(checkpoint, family, None, cache, "test")
    return src, load_hf_config(src)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_stage_loader_gives_the_weights_of_from_pretrained_for_the_stage_only(family, cache):
    from vlmforge.loading import stage_model
    from vlmforge.source import load_model

    src, cfg = _source(f"fixture:{family}", family, cache)
    whole = load_model(src)
    want = dict(whole.named_parameters(remove_duplicate=False))
    buffers = dict(whole.named_buffers())
    covered = set()
    for stage in ("vision", "embedding", "decoder"):
        prefixes = src.family.stage_weights[stage]
        with stage_model(src, cfg, stage) as model:
            got = dict(model.named_parameters(remove_duplicate=False))
            assert set(got) == set(want)
            real = {n for n, p in got.items() if p.device.type != "meta"}
            assert real
            assert {n for n in want if n.startswith(prefixes)} <= real
            for n in real:
                assert got[n].dtype == torch.float32 and torch.equal(got[n], want[n]), n
            for n, b in model.named_buffers():  # computed buffers (rotary frequencies) as from_pretrained has them
                assert torch.equal(b, buffers[n]), n
            tied = [n for n in real if not n.startswith(prefixes)]  # only aliases of a tied parameter
            assert all(any(got[n] is got[m] for m in real if m.startswith(prefixes)) for n in tied)
            covered |= real
        assert all(p.device.type == "meta" for n, p in model.named_parameters() if n in real)  # released
    assert covered == set(want)  # the three stages together read the whole checkpoint


def test_stage_loader_reads_the_hub_legacy_names_and_refuses_a_missing_tensor(cache, tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmforge.core.errors import CheckpointError
    from vlmforge.loading import stage_model

    src, cfg = _source("fixture:qwen2_5_vl", "qwen2_5_vl", cache)
    legacy = tmp_path / "legacy"
    shutil.copytree(src.path, legacy)
    renamed = {}
    for f in legacy.glob("*.safetensors"):
        tensors = load_file(str(f))
        renamed.update({src.family.checkpoint_name(k): v for k, v in tensors.items()})
        f.unlink()
    assert any(k.startswith("visual.") for k in renamed) and any(k.startswith("model.layers.") for k in renamed)
    save_file(renamed, str(legacy / "model.safetensors"))
    lsrc, lcfg = _source(str(legacy), "qwen2_5_vl", cache)
    with stage_model(src, cfg, "decoder") as a, stage_model(lsrc, lcfg, "decoder") as b:
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert all(torch.equal(pa[n], pb[n]) for n in pa if pa[n].device.type != "meta")
    del renamed["model.norm.weight"]
    save_file(renamed, str(legacy / "model.safetensors"))
    lsrc, lcfg = _source(str(legacy), "qwen2_5_vl", cache)
    with pytest.raises(CheckpointError, match="no tensor for parameter 'model.language_model.norm.weight'"):
        with stage_model(lsrc, lcfg, "decoder"):
            pass
    with stage_model(lsrc, lcfg, "vision") as model:  # a stage that does not read it is not affected
        assert model.model.visual.blocks[0].attn.qkv.weight.device.type == "cpu"


def test_an_exported_module_leaves_none_of_its_weights_alive(tmp_path):
    """torch.export's fake-tensor map and onnxscript's rewrite matchers (module globals) kept the last
    exported graph, and with it every weight of the stage, resident until the next export: the validation
    ran on top of the decoder's weights. After export_module nothing but the caller holds them."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).eval()
    refs = [weakref.ref(p) for p in model.parameters()]
    onnx_export.export_module(model, (torch.randn(2, 64),), tmp_path / "m.onnx", input_names=["x"],
                              output_names=["y"], stage="test")
    del model
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_validation_reference_model_is_from_pretrained_bit_for_bit(family, cache):
    """The reference pass's model (read tensor by tensor, no memory map of the shards) has from_pretrained's
    parameters, buffers, ties and memory layout, and so its logits to the last bit."""
    from vlmforge.loading import whole_model
    from vlmforge.source import load_model

    src, cfg = _source(f"fixture:{family}", family, cache)
    want, got = load_model(src), whole_model(src, cfg)
    wp, gp = dict(want.named_parameters(remove_duplicate=False)), dict(got.named_parameters(remove_duplicate=False))
    assert set(wp) == set(gp)
    for n, p in wp.items():
        assert gp[n].device.type == "cpu" and torch.equal(gp[n], p) and gp[n].stride() == p.stride(), n
    assert all(torch.equal(b, dict(want.named_buffers())[n]) for n, b in got.named_buffers())
    assert (got.lm_head.weight is got.get_input_embeddings().weight) == \
        (want.lm_head.weight is want.get_input_embeddings().weight)
    ids = torch.randint(0, cfg.text_config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)


@pytest.mark.parametrize("family,stage,external", [("qwen2_5_vl", "decoder", True), ("qwen3_vl", "decoder", False),
                                                   ("qwen3_vl", "embedding", True), ("qwen2_5_vl", "vision", True),
                                                   ("qwen3_vl", "vision", False), ("qwen3_vl", "vision-dynamic", True)])
def test_a_streamed_export_writes_the_bytes_of_the_in_memory_export(family, stage, external, cache, tmp_path,
                                                                    monkeypatch):
    """A stage traced over stand-ins (uninitialised buffers, never resident) with each weight written from the
    checkpoint at save time gives the files of the export from materialised weights, with the weights inline
    and in external data. Every weight matrix is a stand-in here (the limit is lowered to reach the tiny
    fixtures' 64-wide matrices): the folded Transposes, Qwen3-VL's DeepStack decoder, its DeepStack mergers and
    the position table its vision stages resample (fixed and dynamic grids) included."""
    import vlmforge.loading as loading

    src, cfg = _source(f"fixture:{family}", family, cache)
    dynamic = stage == "vision-dynamic"
    stage = stage.removesuffix("-dynamic")
    options = _options(src.family, stage, dynamic)
    monkeypatch.setattr(loading, "STAND_IN_MIN_ELEMENTS", 1025)
    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    from vlmforge import progress

    out, notes = {}, []
    monkeypatch.setattr(progress.Progress, "_note", lambda self, text: notes.append(text))
    for streamed in (False, True):
        path = tmp_path / str(streamed) / f"{stage}.onnx"
        with progress.Progress(enabled=False).step("export"), \
                loading.stage_model(src, cfg, stage, streamed=streamed) as model:
            stand_ins = loading.active_stand_ins()
            assert (stand_ins is not None and len(stand_ins.entries) >= (10 if stage == "decoder" else 1)) == streamed
            src.family.stage(stage, dynamic=dynamic).export(model, options, path)
        out[streamed] = _files(path)
    layers = cfg.text_config.num_hidden_layers  # the progress says which layer's / block's weights are written
    blocks = cfg.vision_config.depth
    if stage == "decoder":
        assert {f"writing weights: layer {i}/{layers}" for i in range(1, layers + 1)} <= set(notes)
    elif stage == "vision":
        assert {f"writing weights: block {i}/{blocks}" for i in range(1, blocks + 1)} <= set(notes)
    else:
        assert notes and all(n.startswith("writing weights: ") for n in notes)
    assert list(out[True]) == [f"{stage}.onnx", f"{stage}.onnx.data"][:2 if external else 1]
    assert list(out[True]) == list(out[False]) and out[True] == out[False]
    assert loading.active_stand_ins() is None


def _options(fam, stage: str = "decoder", dynamic: bool = False):
    from vlmforge.build.nodes import StageOptions

    if stage == "vision" and dynamic:
        return StageOptions(image_size=None, deepstack=fam.key == "qwen3_vl", min_pixels=64 * 64, max_pixels=128 * 128)
    return StageOptions(image_size=fam.default_sizes[0] if stage == "vision" else None, deepstack=fam.key == "qwen3_vl")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_layer_streamed_reference_computes_the_resident_model_bit_for_bit(family, cache, monkeypatch):
    """validate.reference=streamed: decoder layers, ViT blocks (and DeepStack mergers) read around their forward
    give the logits of the resident model to the last bit, with an image, and hold no block after a forward."""
    from vlmforge.loading import streamed_model, whole_model

    src, cfg = _source(f"fixture:{family}", family, cache)
    want, got = whole_model(src, cfg), streamed_model(src, cfg)
    stream = got._vlmforge_stream
    layers = [p for p in stream.blocks if ".layers." in p]
    assert len(layers) == cfg.text_config.num_hidden_layers and any(".blocks." in p for p in stream.blocks)
    vc = cfg.vision_config
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=torch.Generator().manual_seed(0))
    n_image = 16 // vc.spatial_merge_size ** 2
    ids = torch.tensor([[1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + [5, 6, 7]])
    kwargs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=(ids == cfg.image_token_id).long())
    from vlmforge import progress

    notes = []
    monkeypatch.setattr(progress.Progress, "_note", lambda self, text: notes.append(text))
    with torch.no_grad(), progress.Progress(enabled=False).step("reference"):
        a, b = want(**kwargs).logits, got(**kwargs).logits
        again = got(**kwargs).logits  # the second forward reads every block into the buffers the first gave back
    n = cfg.text_config.num_hidden_layers  # the progress says which block is read
    assert f"reading language_model.layers {n}/{n}" in notes
    assert f"reading visual.blocks {cfg.vision_config.depth}/{cfg.vision_config.depth}" in notes
    assert torch.equal(a, b) and torch.equal(a, again)
    assert stream._pool and not stream._owned  # buffers kept for the next forward, none still in a block
    assert all(p.is_meta for prefix in stream.blocks for n, p in got.named_parameters() if n.startswith(prefix))
    assert not any(p.is_meta for n, p in got.named_parameters() if not n.startswith(tuple(stream.blocks)))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_reference_runs_the_vision_tower_once_per_image_and_state(family, cache):
    """HF's forward takes pixel_values, so the prefill and every decode step of the reference ran the (layer-streamed)
    vision tower again: its outputs are now kept by their inputs. Same logits as a model without the memo, the
    tower read once for two forwards, again after forget_vision(); a changed state (DeepStack off) recomputes it."""
    from vlmforge.loading import streamed_model, whole_model
    from vlmforge.registry import get_family
    from vlmforge.validators.reference import Reference
    from vlmforge.validators.suite import _model_state

    src, cfg = _source(f"fixture:{family}", family, cache)
    fresh = whole_model(src, cfg)
    ref = Reference(family, streamed_model(src, cfg), src.path, None)
    reads = []
    ref.model.model.visual.blocks[0].register_forward_pre_hook(lambda *a: reads.append(1))
    vc = cfg.vision_config
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=torch.Generator().manual_seed(0))
    ids = np.asarray([[1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * (16 // vc.spatial_merge_size ** 2)
                      + [5, 6, 7]], np.int64)
    mask = np.ones_like(ids)

    def want():
        with torch.no_grad():
            return fresh(input_ids=torch.from_numpy(ids), pixel_values=pixels, image_grid_thw=grid,
                         mm_token_type_ids=torch.from_numpy((ids == cfg.image_token_id).astype(np.int64))).logits.numpy()

    on = want()
    first, second = ref.logits(ids, mask, pixels, grid), ref.logits(ids, mask, pixels, grid)
    assert np.array_equal(first, on) and np.array_equal(second, on) and len(reads) == 1
    ref.forget_vision()
    assert np.array_equal(ref.logits(ids, mask, pixels, grid), on) and len(reads) == 2
    off_hook = get_family(family).deepstack_off
    if off_hook is not None:  # Qwen3-VL: DeepStack off changes the tower's outputs; the state scope forgets them
        with off_hook(fresh):
            off = want()
        assert not np.array_equal(off, on)
        with _model_state(SimpleNamespace(deepstack_off=off_hook), ref, deepstack_off=True):
            assert np.array_equal(ref.logits(ids, mask, pixels, grid), off)
        with _model_state(SimpleNamespace(deepstack_off=off_hook), ref, deepstack_off=False):
            assert np.array_equal(ref.logits(ids, mask, pixels, grid), on)


def test_an_int4_build_validated_against_the_streamed_reference_passes_the_same_checks(work_dirs):
    """int4_mixed on the tiny Qwen2.5-VL, validated twice from the same graphs: with the resident reference and the
    layer-streamed one (the INT4 same-weight check then dequantizes each decoder layer's weights when the layer is
    read). Every check passes with the same values; the decoder's versus-FP32 check is against PyTorch FP32 instead of
    the FP32 decoder graph (not opened), and the manifest says which reference the checks used."""
    import json

    from tests.conftest import compose
    from vlmforge.build import run_build

    got = {}
    for ref in ("resident", "streamed"):
        cfg = compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", "model=tiny_qwen2_5_vl",
                      "precision=int4_mixed", f"validate.reference={ref}", f"name=int4-{ref}")
        report = run_build(cfg)
        got[ref] = json.loads((report.directory / "manifest.json").read_text())["validation"]
    for ref, v in got.items():
        assert v["passed"] and v["reference"] == {"model": "transformers", "dtype": "float32", "weights": ref}
    names = {r: [c["name"] for c in v["checks"]] for r, v in got.items()}
    assert "prefill logits vs FP32 PyTorch (no FP32 decoder graph)" in names["resident"]  # exported straight to INT4
    assert "prefill logits vs FP32 PyTorch (validate.reference=streamed)" in names["streamed"]
    same = [n for n in names["streamed"] if "INT4 weights" in n]
    assert len(same) >= 4  # weights found, their step check, the decoder against its own dequantized weights
    for a, b in zip(got["resident"]["checks"], got["streamed"]["checks"], strict=True):
        assert a["value"] == b["value"] and a["passed"] and b["passed"], (a["name"], b["name"])


def test_saving_an_export_gives_its_scratch_data_back_tensor_by_tensor(tmp_path, monkeypatch):
    """save_like_onnx(consume=True) (the exporter's own scratch file): the same files, and the scratch data file's
    blocks are released as its tensors are copied, so the disk holds the weights about once during the save."""
    import os

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    src = _export_torch(tmp_path)
    data = src.with_name(src.name + ".data")
    big = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    with open(data, "ab") as fh:  # room to see blocks released: 2 MiB of real data past the graph's own
        fh.write(big.tobytes())
    before = os.stat(data).st_blocks
    old, new = tmp_path / "old" / "stage.onnx", tmp_path / "new" / "stage.onnx"
    old.parent.mkdir(), new.parent.mkdir()
    save_like_onnx(onnx_export.normalize_model(load_structure(src)), src, old, 0)
    assert os.stat(data).st_blocks == before  # not consumed: untouched
    save_like_onnx(onnx_export.normalize_model(load_structure(src)), src, new, 0, consume=True)
    assert _files(new) == _files(old)
    assert os.stat(data).st_size > 2 << 20 and os.stat(data).st_blocks < before  # the copied tensors' blocks freed


@pytest.mark.parametrize("family,external,cfg", [("qwen2_5_vl", True, 0), ("qwen3_vl", False, 2)],
                         ids=["qwen2_5_vl-external-default", "qwen3_vl-inline-hqq"])
def test_a_decoder_exported_straight_to_int4_is_the_quantized_fp32_export(family, external, cfg, cache, tmp_path,
                                                                           monkeypatch):
    """The decoder quantized as it is exported (transformed_on_save: its weights read from the checkpoint through the
    stand-ins, no FP32 graph written) gives the files of the FP32 export quantized afterwards, and records the same
    source weights; so does a materialised export through the same path (its FP32 graph only in scratch)."""
    import vlmforge.loading as loading
    from vlmforge.exporters.onnx_export import transformed_on_save
    from vlmforge.transforms.quantize_int4 import quantize_int4, quantize_structure

    src, hf = _source(f"fixture:{family}", family, cache)
    options, cfg = _options(src.family), SimpleNamespace(**CONFIGS[cfg])
    vocab = hf.text_config.vocab_size
    monkeypatch.setattr(loading, "STAND_IN_MIN_ELEMENTS", 1025)
    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    fp32 = tmp_path / "fp32" / "decoder.onnx"
    with loading.stage_model(src, hf, "decoder", streamed=True) as model:
        src.family.stage("decoder").export(model, options, fp32)
    (tmp_path / "two-step").mkdir()
    want = quantize_int4(fp32, tmp_path / "two-step" / "decoder.onnx", cfg, vocab=vocab)
    assert want["quantized_nodes"] >= 8 and len(want["source_weights"]) >= 8
    for streamed in (True, False):
        dst = tmp_path / f"fused-{streamed}" / "decoder.onnx"
        with transformed_on_save(lambda s, data, out: quantize_structure(s, data, out, cfg, vocab=vocab)) as got, \
                loading.stage_model(src, hf, "decoder", streamed=streamed) as model:
            assert (loading.active_stand_ins() is not None) == streamed
            src.family.stage("decoder").export(model, options, dst)
        assert got == want, streamed
        assert sorted(p.name for p in dst.parent.iterdir()) == ["decoder.onnx", "decoder.onnx.data"][:2 if external else 1]
        assert _files(dst) == _files(tmp_path / "two-step" / "decoder.onnx"), streamed
