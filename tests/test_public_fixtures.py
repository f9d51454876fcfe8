"""Random-weight checkpoints at the public configs (`vlmforge fixture qwen2_5_vl_3b OUT --layers 1`).

What is written for real here: one checkpoint per family at the real widths and the real vocabulary, but
1 decoder layer and 1-2 ViT blocks (~0.9 GB each; the 151936-row token table alone is 0.6 GB), loaded by
transformers and by vlmforge's own checkpoint checks. Every public config (7B and 8B included) is checked
through the meta-device model and the shard plan only. Determinism and the streaming layout are checked
byte for byte on a synthetic plan small enough to write twice.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from vlmforge.fixtures import public, streaming
from vlmforge.fixtures.streaming import TensorPlan

HUB_TOKEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                 "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                 "<|video_pad|>": 151656}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """qwen2_5_vl_3b (tied, legacy names) and qwen3_vl_2b (tied, DeepStack) at 1 layer, 2 ViT blocks."""
    root = tmp_path_factory.mktemp("public")
    return {name: public.write_public_fixture(name, root / name, layers=1, vision_layers=2, max_shard_bytes=400_000_000)
            for name, family in (("qwen2_5_vl_3b", "qwen2_5_vl"), ("qwen3_vl_2b", "qwen3_vl"))}


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen3_vl_2b"])
def test_written_checkpoint_loads_in_transformers_and_passes_vlmforge_checks(written, name, tmp_path):
    import torch
    import transformers

    from vlmforge.source import check_model_size, open_source

    folder = written[name]
    family, _ = public.public_configs()[name]
    cfg = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model, info = cls.from_pretrained(str(folder), dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert next(model.parameters()).dtype == torch.bfloat16
    source = open_source(str(folder), family, None, tmp_path, "test")
    count = check_model_size(source, model.config)
    assert count == source.weight_elements == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([[151644, 84, 82, 198, 307, 151645]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # bf16 on CPU: no FP32 copy of the model
    assert torch.isfinite(logits).all() and 1.0 < float(logits.std()) < 4.0  # LOGIT_GAIN: std ~2, not flat


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen3_vl_2b"])
def test_index_matches_the_shards(written, name):
    folder = written[name]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))
    assert all(s == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards))
    seen, total = {}, 0
    for shard in shards:
        header = _header(folder / shard)
        for key, v in header.items():
            if key == "__metadata__":
                continue
            assert v["dtype"] == "BF16"
            seen[key] = shard
            total += v["data_offsets"][1] - v["data_offsets"][0]
        assert (folder / shard).stat().st_size <= 400_000_000 + 8 + 65536 or len(header) == 2
    assert seen == index["weight_map"] and total == index["metadata"]["total_size"]
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert (cfg.get("torch_dtype") or text.get("dtype")) == "bfloat16"
    assert "lm_head.weight" not in seen  # tied heads are not stored, as on the hub
    prefix = "visual." if name.startswith("qwen2_5") else "model.visual."
    assert any(k.startswith(prefix + "blocks.1.") for k in seen) and not any(".blocks.2." in k for k in seen)


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen3_vl_2b"])
def test_tokenizer_maps_special_tokens_to_the_config_ids(written, name):
    from transformers import AutoTokenizer

    folder = written[name]
    cfg = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(folder))
    for text, tid in HUB_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(text) == tid
    assert cfg["image_token_id"] == 151655 and cfg["vision_start_token_id"] == 151652
    assert cfg["vision_end_token_id"] == 151653
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    ids = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert [151652, 151655, 151653] == [i for i in ids if i in (151652, 151655, 151653)]
    assert max(i for i in ids if i < 151643) < 500  # ordinary ids come from the small BPE
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["bos_token_id"] == gen["pad_token_id"] == 151643


def test_every_public_config_matches_the_published_size_and_layout():
    """All five at full depth, on the meta device: parameter counts within 0.5% of the released models,
    tied 3B/2B/4B and untied 7B/8B heads, hub tensor names, shards within the limit."""
    import importlib

    expect_untied = {"qwen2_5_vl_7b", "qwen3_vl_8b"}
    for name, (family, cfg) in public.public_configs().items():
        published = importlib.import_module(f"vlmforge.families.{family}.public").PUBLISHED_PARAMETERS[name]
        plan = public.tensor_plan(family, cfg)
        count = sum(t.nbytes for t in plan) // 2
        assert abs(count / published - 1) < 0.005, (name, count)
        names = {t.name for t in plan}
        assert ("lm_head.weight" in names) == (name in expect_untied), name
        if family == "qwen2_5_vl":
            assert "model.embed_tokens.weight" in names and "visual.merger.mlp.0.weight" in names
            assert not any(n.startswith("model.language_model.") for n in names)
        else:
            assert "model.language_model.embed_tokens.weight" in names and "model.visual.pos_embed.weight" in names
            assert any(n.startswith("model.visual.deepstack_merger_list.2.") for n in names)
        shards = streaming.plan_shards(plan, public.DEFAULT_SHARD_BYTES)
        assert all(sum(t.nbytes for t in s) <= public.DEFAULT_SHARD_BYTES for s in shards)


def test_both_rope_layouts_give_the_same_transformers_config(tmp_path):
    import transformers

    for name in ("qwen2_5_vl_7b", "qwen3_vl_4b"):
        got = []
        for layout in ("hub", "transformers5"):
            _, cfg = public.fixture_config(name, layers=2, rope_layout=layout)
            d = tmp_path / f"{name}-{layout}"
            d.mkdir()
            (d / "config.json").write_text(json.dumps(cfg))
            text = transformers.AutoConfig.from_pretrained(str(d)).text_config
            rope = {k: v for k, v in text.rope_parameters.items() if k != "type"}
            got.append((rope, text.num_hidden_layers, text.hidden_size))
        assert got[0] == got[1], name
    _, q3 = public.fixture_config("qwen3_vl_4b", rope_layout="transformers5")
    assert q3["text_config"]["rope_parameters"]["mrope_interleaved"] is True and "rope_scaling" not in q3["text_config"]


def test_reduced_depth_keeps_window_attention_and_deepstack_inside_the_tower():
    _, q25 = public.fixture_config("qwen2_5_vl_3b", layers=2, vision_layers=4)
    assert q25["num_hidden_layers"] == 2 and q25["vision_config"]["fullatt_block_indexes"] == [3]
    _, q25 = public.fixture_config("qwen2_5_vl_3b", vision_layers=16)
    assert q25["vision_config"]["fullatt_block_indexes"] == [7, 15]
    _, q3 = public.fixture_config("qwen3_vl_8b", layers=1, vision_layers=9)
    assert q3["text_config"]["num_hidden_layers"] == 1 and q3["vision_config"]["deepstack_visual_indexes"] == [2, 5, 8]
    _, q3 = public.fixture_config("qwen3_vl_4b", vision_layers=1)
    assert q3["vision_config"]["deepstack_visual_indexes"] == [0]
    with pytest.raises(Exception, match="outside 1..36"):
        public.fixture_config("qwen3_vl_4b", layers=37)


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        assert n % 8 == 0
        return json.loads(fh.read(n))


def _draw_plan():
    return [TensorPlan("b.norm.weight", (3000,)), TensorPlan("a.proj.weight", (700, 9000)),
            TensorPlan("a.proj.bias", (700,)), TensorPlan("c.embed_tokens.weight", (5000, 64))]


def test_streaming_writer_is_deterministic_and_readable(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 100_000)  # several chunks per matrix
    digests = []
    for run in ("one", "two"):
        out = tmp_path / run
        out.mkdir()
        streaming.write_shards(out, _draw_plan(), public.draw, seed=7, max_shard_bytes=10_000_000)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1] and len(digests[0]) == 4  # 3 shards (the 12.6 MB matrix alone) + index
    other = tmp_path / "seed8"
    other.mkdir()
    streaming.write_shards(other, _draw_plan(), public.draw, seed=8, max_shard_bytes=10_000_000)
    assert hashlib.sha256((other / "model-00001-of-00003.safetensors").read_bytes()).hexdigest() != \
        digests[0]["model-00001-of-00003.safetensors"]
    loaded = {k: v for p in sorted((tmp_path / "one").glob("*.safetensors")) for k, v in load_file(p).items()}
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {t.name: t.shape for t in _draw_plan()}
    w = loaded["a.proj.weight"].float()
    assert w.dtype == torch.float32 and abs(float(w.std()) - 1.5 / 9000 ** 0.5) < 2e-3  # fan-in scaled
    assert abs(float(loaded["b.norm.weight"].float().mean()) - 1.0) < 0.01  # gains near 1
    assert float(loaded["a.proj.bias"].float().abs().max()) < 0.1  # small biases
    assert streaming.chunk_seed(7, "x", 0) == streaming.chunk_seed(7, "x", 0) != streaming.chunk_seed(7, "x", 1)


def test_cli_writes_public_fixture_and_refuses_misuse(tmp_path, capsys):
    from vlmforge.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["fixture", "qwen3_vl_4b", str(tmp_path / "full"), "--layers", "1"]) == 2
    assert "writes only new or empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["fixture", "qwen2_5_vl", str(tmp_path / "t"), "--layers", "1"]) == 2
    assert "--layers" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["fixture", "qwen9_vl_1b", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert "qwen2_5_vl_3b" in err and "Traceback" not in err
    assert main(["fixture", "qwen3_vl_4b", str(tmp_path / "v"), "--vision-layers", "99"]) == 2
    assert "outside 1..24" in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_prefetched_shard_hashes_are_used_only_for_the_very_file_they_were_started_on(written, tmp_path):
    """A build starts hashing the checkpoint's shards beside its imports (source.prefetch_weight_hashes);
    open_source takes those digests for files whose path, size, mtime and inode did not change, and hashes a
    replaced shard again. A folder that is not a local checkpoint starts nothing."""
    import shutil

    from vlmforge import source as S

    folder = tmp_path / "ck"
    shutil.copytree(written["qwen2_5_vl_3b"], folder)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    S.prefetch_weight_hashes(str(folder))
    started = {k: v for k, v in S._PREFETCH.items() if k.startswith(str(folder.resolve()))}
    assert len(started) == len(shards)
    for job in started.values():
        job["done"].wait()
        job["sha256"] = "0" * 64  # stand-in result: proves open_source takes the prefetched digest
    data = shards[0].read_bytes()
    shards[0].unlink()
    shards[0].write_bytes(data)  # same bytes, a new file: its prefetched digest must not be taken
    src = S.open_source(str(folder), "qwen2_5_vl", None, tmp_path / "cache", "test")
    assert src.weight_files[shards[0].name] == want[shards[0].name]
    assert all(src.weight_files[p.name] == "0" * 64 for p in shards[1:])
    assert not any(k.startswith(str(folder.resolve())) for k in S._PREFETCH)  # taken once, then gone
    before = dict(S._PREFETCH)
    S.prefetch_weight_hashes("fixture:qwen2_5_vl")
    S.prefetch_weight_hashes(str(tmp_path / "missing"))
    assert S._PREFETCH == before
