"""What one matrix cell asks the engine for: CPUs, memory, GPUs.

Memory is estimated from the checkpoint, because that is what decides it (field notes, section 12: a
Qwen2.5-VL-3B-width build peaks at 4.2x its FP32 weights with validation, 1.8x without, over a ~1.5 GB base
of torch + onnxruntime). Asking the engine for that much lets it refuse to start four 20 GB builds on a
24 GB node; Ray and Slurm both treat memory as a schedulable resource.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

GB = 1 << 30
BASE_BYTES = int(1.5 * GB)  # torch + transformers + onnxruntime imported, a tiny model built: measured 1.1-1.4 GB
FACTOR_VALIDATE = 4.5  # peak / FP32 weight bytes with validation (PyTorch model and ONNX sessions resident together)
FACTOR_NO_VALIDATE = 2.0  # export only: the model plus the exporter's copy


@dataclass(frozen=True)
class CellResources:
    num_cpus: float
    memory_bytes: int
    num_gpus: float

    def describe(self) -> str:
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        return f"{self.num_cpus:g} CPU, {self.memory_bytes / GB:.1f} GB{gpus}"


def fp32_weight_bytes(folder: Path) -> int | None:
    """Bytes of the checkpoint's parameters at FP32, from the safetensors headers (no tensor is read).
    None when the folder has no safetensors (a hub id not yet downloaded)."""
    from vlmforge.source import read_safetensors_header

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header, _ = read_safetensors_header(fh)
        for name, t in header.items():
            if name != "__metadata__":
                total += math.prod(t["shape"]) * 4
    return total


def estimate_memory(folder: Path | None, validate: bool, fallback_gb: float) -> int:
    weights = fp32_weight_bytes(folder) if folder is not None and Path(folder).is_dir() else None
    if weights is None:
        return int(fallback_gb * GB)
    return BASE_BYTES + int(weights * (FACTOR_VALIDATE if validate else FACTOR_NO_VALIDATE))


def checkpoint_folder(checkpoint: str, cache_dir: str) -> Path | None:
    """The local folder of a checkpoint, without downloading or writing anything (None if not local yet)."""
    from vlmforge.source import FIXTURE_PREFIX, TRAINED_SUFFIX, fixture_dir

    if checkpoint.startswith(FIXTURE_PREFIX):
        key = checkpoint[len(FIXTURE_PREFIX):]
        trained = key.endswith(TRAINED_SUFFIX)
        return fixture_dir(Path(cache_dir), key.removesuffix(TRAINED_SUFFIX), trained)
    path = Path(checkpoint).expanduser()
    return path if path.is_dir() else None


def cell_resources(checkpoint: str, cache_dir: str, validate: bool, target: str, opts: dict) -> CellResources:
    """`opts` is the launcher recipe's `cell` node: num_cpus, memory_gb (set: wins over the estimate),
    fallback_memory_gb (a checkpoint not on local disk yet), num_gpus (for target=cuda cells)."""
    memory_gb = opts.get("memory_gb")
    memory = int(float(memory_gb) * GB) if memory_gb else estimate_memory(
        checkpoint_folder(checkpoint, cache_dir), validate, float(opts.get("fallback_memory_gb") or 16))
    gpus = (1.0 if opts.get("num_gpus") is None else float(opts["num_gpus"])) if target == "cuda" else 0.0
    return CellResources(float(opts.get("num_cpus") or 1), memory, gpus)
