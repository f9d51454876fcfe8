"""Environment switches read in more than one place, read one way."""

from __future__ import annotations

import os

# huggingface_hub's own reading of its boolean switches (constants.ENV_VARS_TRUE_VALUES).
TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for offline mode, read as huggingface_hub reads it (1/on/yes/true, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES
