"""Runtime configs written beside every artifact set (onnxruntime-genai `genai_config.json`,
`processor_config.json`). Filled in by the runtime work; the build calls `write_runtime_configs`."""

from __future__ import annotations

from pathlib import Path


def write_runtime_configs(directory: Path, family_key: str, hf_config, contracts: dict, params, deepstack: bool) -> list[Path]:
    """Write the runtime config files into `directory`; return their paths."""
    return []
