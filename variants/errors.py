"""The project's error types for making and loading variants.

Every message names the bad value, what is allowed and what to do instead;
the CLI prints them as one line (exit 2 for bad input, 1 for runtime failures).
"""

from __future__ import annotations


class MemadaptError(Exception):
    """Base class of every error memadapt raises on purpose."""


class SpecError(MemadaptError, ValueError):
    """A transformation spec or chain is invalid (bad input: CLI exit 2)."""


class UnknownNameError(MemadaptError, KeyError):
    """A name (model, family, backend, data source) is not registered (CLI exit 2)."""

    def __init__(self, what: str, name: str, known: list[str] | tuple[str, ...]):
        self.what, self.name, self.known = what, name, list(known)
        super().__init__(f"unknown {what} {name!r}; known: {', '.join(sorted(self.known))}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DuplicateNameError(MemadaptError, ValueError):
    """A name is registered twice with different entries (pass ``replace=True`` to mean it)."""


class StoreError(MemadaptError):
    """The variant store is missing, inconsistent or corrupt."""


class KeyConflictError(StoreError):
    """A variant name is already stored from another base, spec chain or options."""


class CorruptArtifactError(StoreError):
    """A stored file does not match the hash recorded in its manifest."""


class ExportError(MemadaptError):
    """ONNX export failed or the exported graph disagrees with torch."""


class BackendError(MemadaptError):
    """A variant could not be loaded into a runnable session on a device."""


class DataError(MemadaptError, ValueError):
    """Calibration or evaluation data is missing or malformed (bad input)."""
