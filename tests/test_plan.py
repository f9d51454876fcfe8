"""The plan before a build: predicted memory and disk, and an early, clear refusal."""

from __future__ import annotations

import dataclasses

import pytest

from vlmforge.core.errors import ResourceError
from vlmforge.launch.plan import BuildPlan, check_plan, make_plan, memory_available
from vlmforge.launch.resources import GB


def test_plan_scales_with_the_model_and_needs_no_model_when_cached(tmp_path):
    fp32 = make_plan(3_754_622_976, {"vision": "fp32", "embedding": "fp32", "decoder": "fp32"}, True, True, 30 * GB,
                     tmp_path)
    assert fp32.fp32_bytes == 4 * 3_754_622_976 and fp32.target_bytes == fp32.fp32_bytes
    assert fp32.peak_rss > fp32.fp32_bytes  # the model plus the exporter's copy
    int4 = make_plan(3_754_622_976, {"vision": "fp16", "embedding": "fp32", "decoder": "int4"}, True, True, 30 * GB,
                     tmp_path)
    assert int4.target_bytes == fp32.target_bytes  # without stage counts, an upper bound: the FP32 embedding
    # with them, the set as built (3B: 0.67 B vision, 0.31 B embedding table, 3.09 B decoder with the tied head)
    stages = {"vision": 669_000_000, "embedding": 311_164_928, "decoder": 3_085_938_688}
    per_stage = make_plan(3_754_622_976, {"vision": "fp16", "embedding": "fp32", "decoder": "int4"}, True, True,
                          30 * GB, tmp_path, stage_parameters=stages)
    assert per_stage.target_bytes == int(669_000_000 * 2 + 311_164_928 * 4 + 3_085_938_688 * 0.6)
    assert "as built" in per_stage.describe() and per_stage.target_bytes < 0.35 * fp32.target_bytes
    cached = make_plan(3_754_622_976, {"vision": "fp32", "embedding": "fp32", "decoder": "fp32"}, True, False, 0,
                       tmp_path)
    assert cached.peak_rss < 2 * GB  # every stage and the validation cached: no model is loaded
    assert fp32.disk_available is not None and fp32.disk_available > 0


# Measured (README "Scale check"): Qwen2.5-VL-3B widths, 2 ViT blocks, fp32, validation on; the build's
# process-tree peak RSS sampled 4x a second. (FP32 weight bytes, peak RSS bytes.)
MEASURED_3B_WIDTHS = {2: (2_171_756_992, int(3.71 * GB)), 4: (2_788_372_928, int(4.29 * GB)),
                      8: (4_021_604_800, int(6.13 * GB))}


@pytest.mark.parametrize("layers", sorted(MEASURED_3B_WIDTHS))
def test_plan_predicts_the_measured_peak_of_a_validated_build_within_fifteen_percent(tmp_path, layers):
    fp32_bytes, measured = MEASURED_3B_WIDTHS[layers]
    stages = {"vision": "fp32", "embedding": "fp32", "decoder": "fp32"}
    plan = make_plan(fp32_bytes // 4, stages, True, True, 0, tmp_path)
    assert measured <= plan.peak_rss <= 1.15 * measured  # never below what was measured, not far above it
    no_validate = make_plan(fp32_bytes // 4, stages, False, True, 0, tmp_path)
    assert no_validate.peak_rss < plan.peak_rss


def test_memory_available_reads_this_machine():
    avail = memory_available()
    assert avail is not None and 0 < avail < 1 << 50


def test_plan_refuses_a_build_the_machine_cannot_hold_with_the_fix():
    plan = BuildPlan(8_292_000_000, 33 * GB, 33 * GB, 70 * GB, 70 * GB, 20 * GB, 75 * GB)
    with pytest.raises(ResourceError) as err:
        check_plan(plan, "recipes/build.yaml: model.checkpoint=/models/7b")
    text = err.value.render()
    assert "predicted peak memory 70.0 GiB > 20.0 GiB available" in text
    assert "precision=int4_mixed" in text and "validate=off" in text and "memory_check=false" in text
    check_plan(plan, "x", enforce=False)  # memory_check=false: logged, not refused
    check_plan(BuildPlan(1, 4, 4, GB, GB, 20 * GB, 75 * GB), "x")  # fits: nothing raised
    both = BuildPlan(8_292_000_000, 33 * GB, 33 * GB, 70 * GB, 80 * GB, 20 * GB, 60 * GB, "/data/out")
    with pytest.raises(ResourceError) as err:  # short of memory and disk: one error names both
        check_plan(both, "x")
    assert "70.0 GiB > 20.0 GiB available" in err.value.render()
    assert "disk is short too: about 80.0 GiB needed on /data/out, 60.0 GiB free" in err.value.render()


def test_plan_refuses_a_too_small_or_read_only_output_disk_as_a_file_system_error(tmp_path):
    from vlmforge.core.errors import FileSystemError

    small = BuildPlan(1, 4, 4, GB, 70 * GB, 20 * GB, 5 * GB, str(tmp_path))
    with pytest.raises(FileSystemError) as err:
        check_plan(small, "x")
    text = err.value.render()
    assert "no space left" in text and "about 70.0 GiB is needed" in text and str(tmp_path) in text
    check_plan(small, "x", enforce=False)  # memory_check=false: logged, not refused
    read_only = BuildPlan(1, 4, 4, GB, GB, 20 * GB, 75 * GB, str(tmp_path), read_only=True)
    with pytest.raises(FileSystemError, match="Read-only file system"):
        check_plan(read_only, "x")


def test_the_plan_of_a_streamed_int4_build_covers_the_measured_full_depth_3b(tmp_path):
    """Measured: full-depth Qwen2.5-VL-3B (3,754,622,976 parameters), int4_mixed, validate.reference=streamed:
    peak RSS 10.29 GiB (README "Scale check")."""
    plan = make_plan(3_754_622_976, {"vision": "fp16", "embedding": "fp32", "decoder": "int4"}, True, True, 0,
                     tmp_path, "streamed")
    measured = int(10.29 * GB)
    assert measured <= plan.peak_rss <= 1.15 * measured


def test_a_streamed_reference_plans_a_7b_int4_build_inside_24_gb_and_refuses_its_fp32_build(tmp_path):
    """Qwen2.5-VL-7B (8.29 B parameters, 33 GB as FP32) with validate.reference=streamed (auto at this size):
    int4_mixed is planned inside what a 24 GB box has; FP32 needs the FP32 decoder graph's sessions and is
    refused up front with the plan and the fixes."""
    params = 8_292_166_656
    int4 = make_plan(params, {"vision": "fp16", "embedding": "fp32", "decoder": "int4"}, True, True, 70 * GB, tmp_path,
                     "streamed")
    fp32 = make_plan(params, {"vision": "fp32", "embedding": "fp32", "decoder": "fp32"}, True, True, 70 * GB, tmp_path,
                     "streamed")
    resident = make_plan(params, {"vision": "fp16", "embedding": "fp32", "decoder": "int4"}, True, True, 70 * GB,
                         tmp_path)
    assert int4.peak_rss < 22 * GB < fp32.peak_rss < resident.peak_rss
    box = BuildPlan(params, fp32.fp32_bytes, fp32.target_bytes, fp32.peak_rss, 0, int(22.6 * GB), 75 * GB)
    with pytest.raises(ResourceError) as err:
        check_plan(box, "recipes/build.yaml: model.checkpoint=/models/7b")
    assert "validate.reference=streamed" in err.value.render() and "precision=int4_mixed" in err.value.render()
    with pytest.raises(ResourceError) as err:  # already streamed: the fix does not offer it again
        check_plan(dataclasses.replace(fp32, memory_available=int(22.6 * GB), disk_available=None), "x")
    assert "validate.reference=streamed" not in err.value.fix and "precision=int4_mixed" in err.value.fix
    check_plan(BuildPlan(params, int4.fp32_bytes, int4.target_bytes, int4.peak_rss, 0, int(22.6 * GB), 75 * GB), "x")
