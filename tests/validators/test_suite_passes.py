"""Validation in two passes: the reference pass frees the PyTorch model before any graph session opens,
and the graph pass reproduces the build's validation records exactly from the stored references."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from tests.conftest import compose


def test_reference_pass_frees_the_model_and_graph_pass_reproduces_the_build(qwen25_392, work_dirs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlmforge.artifact.manifest import read_manifest
    from vlmforge.build import StageOptions, validation_images
    from vlmforge.host.image import image_params
    from vlmforge.registry import get_family
    from vlmforge.source import fixture_dir
    from vlmforge.validators.suite import SuiteInputs, graph_pass, kinds, reference_pass

    cfg = compose(f"out_dir={work_dirs['out']}", f"cache_dir={work_dirs['cache']}", "model=tiny_qwen2_5_vl",
                  "vision=small")
    family = get_family("qwen2_5_vl")
    src = fixture_dir(work_dirs["cache"], "qwen2_5_vl")
    holder = [Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src)).eval()]
    config, alive = holder[0].config, weakref.ref(holder[0])
    contracts = {s: family.stage(s).contract(config, StageOptions(392, False)) for s in ("vision", "embedding", "decoder")}
    params = image_params(src, config, 392, family.image.mean, family.image.std)
    inp = SuiteInputs("qwen2_5_vl", qwen25_392.directory, contracts, dict.fromkeys(contracts, "fp32"), params, False)
    images = validation_images(cfg.validate)

    ref, refs = reference_pass(inp, holder.pop, src, cfg.validate, images)
    gc.collect()
    assert alive() is None and ref.model is None  # nothing keeps the model: its memory is back
    assert refs.decoder["prefill"].ndim == 2 and refs.decoder["prefill"].dtype == np.float32
    assert len(refs.chain) == 2 and all(len(w["tokens"]) == cfg.validate.chain_tokens for w in refs.chain)

    checks, variant = graph_pass(inp, ref, refs, cfg.validate, images)
    recorded = [c for c in read_manifest(qwen25_392.directory)["validation"]["checks"] if c["metric"] not in
                ("errors", "mismatches")]  # the contract checks run before both passes
    # The same checks, in the same order, with the same verdicts; the values agree to rounding (this process
    # loads the model its own way; builds at two commits agree to the byte: make compare-commits).
    key = lambda c: (c["stage"], c["name"], c["metric"], c["tolerance"], c["passed"], c["kind"])  # noqa: E731
    assert [key(c.to_json()) for c in checks] == [key(c) for c in recorded] and variant == {}
    for got, want in zip(checks, recorded):
        assert np.isclose(got.value, want["value"], rtol=0.05, atol=1e-6), (got, want)
    assert {c["kind"] for c in recorded} == {"graph"}  # FP32: same weights on both sides, every check


def test_check_kinds_mark_transformed_stages_and_task_as_quality():
    from pathlib import Path

    from vlmforge.validators.results import CheckResult
    from vlmforge.validators.suite import SuiteInputs, kinds

    inp = SuiteInputs("qwen2_5_vl", Path("."), {}, {"vision": "fp16", "embedding": "fp32", "decoder": "int4"},
                      None, False)
    checks = [CheckResult(s, "n", "max_rel", 0.0, 1.0, True) for s in ("vision", "embedding", "decoder", "chain", "task")]
    assert [c.kind for c in kinds(checks, inp)] == ["quality", "graph", "quality", "quality", "quality"]
