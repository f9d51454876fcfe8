"""The plan before a build: what it weighs and what the machine can hold, checked before any work.

Printed before a build starts: parameters, FP32 and target bytes, predicted peak resident memory and
disk. A build the machine cannot hold is refused there, with the fix, instead of dying (or swapping the
box to a halt) an hour in. The prediction is a fit to measured builds (resources.py has the base; the
factors are measured at Qwen2.5-VL-3B widths with 2, 4 and 8 decoder layers, README "Scale check"): an export
holds one stage's weights (vlmforge.loading), freed before the next; a validation holds the PyTorch model
alone, then the ONNX sessions alone (the chain: all three graphs, the tied embedding table in two of them).
Besides the reference model's load (its checkpoint mapped), peak RSS grows by 1.0x a layer's FP32 bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlmforge.core.errors import ResourceError, from_os_error, human_bytes as _human
from vlmforge.launch.resources import BASE_BYTES, GB

log = logging.getLogger(__name__)
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int4": 0.6}  # int4: 4-bit + scales, float leftovers (measured 0.2-0.4x)
# (peak RSS - BASE_BYTES) / FP32 weight bytes, measured (validation on, fp32; 2 / 4 / 8 layers at 3B widths):
FACTOR_EXPORT = 1.0  # exporting: the largest stage's FP32 weights (0.76 / 0.91 / 0.69 measured)
# validating: from_pretrained's FP32 model plus its memory map of the bf16 checkpoint (half the FP32 bytes,
# file-backed pages), then the ONNX sessions alone (1.09 / 1.07 / 1.23 measured; the map grows with depth)
FACTOR_VALIDATE = 1.25
FACTOR_INT4 = 1.45  # the INT4 quantizer on the decoder, on top of the resident model (field notes)
# validate.reference=streamed (vlmforge.loading.streamed_model; real sizes): the embedding and decoder exports
# and the transforms hold one weight at a time, the vision export its stage (~0.2x of a Qwen-VL), the reference
# its resident part and one block; what is left is the graph pass's sessions: the FP32 decoder and embedding
# graphs for an FP32 build, the transformed ones otherwise. int4: a full-depth Qwen2.5-VL-3B int4_mixed build peaked
# at 10.29 GiB = 0.735x its FP32 bytes, in the INT4 same-weight reference (the packed INT4 weights, the tied table
# and the dequantized head resident; README "Scale check"). fp32 / fp16: the FP32 / FP16 decoder and embedding
# sessions of the chain (not yet measured at full depth with a streamed reference)
FACTOR_STREAMED = {"fp32": 1.0, "fp16": 0.6, "int4": 0.65}
FACTOR_STREAMED_EXPORT = 0.35


@dataclass(frozen=True)
class BuildPlan:
    parameters: int
    fp32_bytes: int
    target_bytes: int
    peak_rss: int
    disk: int
    memory_available: int | None
    disk_available: int | None
    out_dir: str = ""  # the folder the disk figures are for
    read_only: bool = False  # that folder's file system is mounted read-only
    reference: str = "resident"  # validate.reference the plan is for

    def describe(self) -> str:
        avail = f"{_human(self.memory_available)} available" if self.memory_available else "available unknown"
        disk = f"{_human(self.disk_available)} free" if self.disk_available is not None else "free unknown"
        return (f"plan: {self.parameters / 1e9:.3f} B parameters, {_human(self.fp32_bytes)} as FP32, "
                f"{_human(self.target_bytes)} as built (each stage at its precision); predicted peak memory "
                f"{_human(self.peak_rss)} ({avail}), disk {_human(self.disk)} ({disk})")


def memory_available() -> int | None:
    """MemAvailable, capped by the cgroup's limit minus its usage (v2, then v1): what this build may use."""
    values = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text != "max" and int(text) < (1 << 60):
                values.append(int(text) - int(Path(usage).read_text().strip()))
                break
        except (OSError, ValueError):
            continue
    return min(values) if values else None


def _free_disk(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def stage_bytes(stage_parameters: dict, precisions: dict[str, str]) -> dict:
    """{stage: bytes its weights take in the set, at the stage's precision}. A transform this table does not
    know (a new row in vlmforge.transforms) is planned at FP32 size."""
    return {s: int(n * BYTES_PER_PARAM.get(precisions.get(s, "fp32"), 4.0)) for s, n in stage_parameters.items()}


def make_plan(parameters: int, precisions: dict[str, str], validate: bool, needs_model: bool, disk_bytes: int,
              out_dir: Path, reference: str = "resident", stage_parameters: dict | None = None) -> BuildPlan:
    """`stage_parameters` {stage: parameters its graph holds} makes the target figure the set's weight bytes
    (a tied table counts in both graphs that hold it); without it, an upper bound: every parameter at the
    widest precision of the build."""
    fp32 = parameters * 4
    if stage_parameters:
        target = sum(stage_bytes(stage_parameters, precisions).values())
    else:
        target = int(parameters * max(BYTES_PER_PARAM.get(p, 4.0) for p in precisions.values()))
    if reference == "streamed":
        factor = max(FACTOR_STREAMED_EXPORT, FACTOR_STREAMED.get(precisions["decoder"], 1.0) if validate else 0.0)
    else:
        factor = max(FACTOR_EXPORT, FACTOR_VALIDATE if validate else 0.0)
        if "int4" in precisions.values():
            factor = max(factor, 1.0 + FACTOR_INT4)
    peak = BASE_BYTES + (int(fp32 * factor) if needs_model else 0)
    return BuildPlan(parameters, fp32, target, peak, disk_bytes, memory_available(), _free_disk(Path(out_dir)),
                     str(out_dir), _read_only(Path(out_dir)), reference)


def _read_only(path: Path) -> bool:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
            except OSError:
                return False
    return False


def check_plan(plan: BuildPlan, where: str, enforce: bool = True) -> None:
    """Log the plan; refuse (ResourceError, exit 2) when the predicted peak memory or disk exceeds what the
    machine has. `enforce=False` (recipe key memory_check=false) logs the shortfall and goes on."""
    log.info("%s", plan.describe())
    short = None
    if plan.memory_available is not None and plan.peak_rss > plan.memory_available:
        short = f"predicted peak memory {_human(plan.peak_rss)} > {_human(plan.memory_available)} available"
    if short is None or not enforce:
        if short:
            log.warning("memory_check=false: going on although %s", short)
        _check_disk(plan, enforce)
        return
    # both shortfalls in one error: a user who frees the disk should not then learn about the memory
    disk = ""
    if plan.disk_available is not None and plan.disk > plan.disk_available:
        disk = f"; its disk is short too: about {_human(plan.disk)} needed on {plan.out_dir}, {_human(plan.disk_available)} free"
    raise ResourceError(
        f"this machine cannot hold the build: {short} ({plan.parameters / 1e9:.2f} B parameters, "
        f"{_human(plan.fp32_bytes)} as FP32){disk}", where=where,
        fix="run on a machine with more memory (or free some), choose a smaller precision (precision=int4_mixed), "
            + ("" if plan.reference == "streamed" else
               "validate against a layer-streamed reference (validate.reference=streamed), ")
            + "export without validation (validate=off), or set memory_check=false to try anyway")


def _check_disk(plan: BuildPlan, enforce: bool) -> None:
    """A read-only or too-small output file system is refused before any work, with the same error a failed
    write gets (FileSystemError: the path, the bytes needed and free)."""
    import errno

    code = errno.EROFS if plan.read_only else None
    if code is None and plan.disk_available is not None and plan.disk > plan.disk_available:
        if not enforce:
            log.warning("memory_check=false: going on although the build needs about %s on %s (%s free)",
                        _human(plan.disk), plan.out_dir, _human(plan.disk_available))
            return
        code = errno.ENOSPC
    if code is not None:
        raise from_os_error(OSError(code, os.strerror(code), plan.out_dir), "planning the build",
                            where=plan.out_dir, needed=plan.disk)
