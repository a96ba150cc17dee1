"""The error hierarchy. Every user-facing failure is one of these.

Messages follow one shape: ``<what> (<where>): <how to fix>``, so the CLIs can print
``error: {exc}`` as a single line and Python callers can catch by type.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "OutputError",
    "SiglipScratchError",
    "SourceError",
]


class SiglipScratchError(Exception):
    """Root of every error this package raises for bad input."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        msg = what
        if where:
            msg += f" ({where})"
        if fix:
            msg += f": {fix}"
        super().__init__(msg)


class ConfigError(SiglipScratchError, ValueError):
    """A config value is missing, of the wrong type, or breaks an invariant."""


class CheckpointError(SiglipScratchError, ValueError):
    """A weights file is corrupt, or its keys/shapes do not fit the model."""


class InputError(SiglipScratchError, ValueError):
    """A tensor, image or argument passed by the user is unusable."""


class SourceError(SiglipScratchError, OSError):
    """A file, folder or hub repo cannot be found or read."""


class OutputError(SiglipScratchError, OSError):
    """An output location cannot be written safely."""
