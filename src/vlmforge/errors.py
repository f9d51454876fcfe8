"""User-facing errors: every one says what failed, where, and how to fix it.

The CLI catches `VlmforgeError` and prints `str(err)` without a traceback; anything else is a bug.
"""

from __future__ import annotations


class VlmforgeError(Exception):
    """An error caused by input the user controls (recipe, checkpoint, artifact, image...)."""

    kind = "VlmforgeError"

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.kind}: {self.what}"]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


class RecipeError(VlmforgeError):
    kind = "RecipeError"


class CheckpointError(VlmforgeError):
    kind = "CheckpointError"


class ExportError(VlmforgeError):
    kind = "ExportError"


class ContractError(VlmforgeError):
    kind = "ContractError"


class ValidationFailed(VlmforgeError):
    kind = "ValidationFailed"


class ArtifactError(VlmforgeError):
    kind = "ArtifactError"


class InputError(VlmforgeError):
    kind = "InputError"
