"""`vlmforge generate` / `vlmforge chat` sub-commands (registered by vlmforge.cli)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the runtime sub-commands to the CLI's sub-parsers."""
    return None
