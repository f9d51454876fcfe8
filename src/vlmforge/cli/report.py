"""What more than one command prints."""

from __future__ import annotations


def print_checks(checks) -> None:
    for c in checks:
        print("  " + c.line())
