"""The profiler's error type."""

from __future__ import annotations

from variants.errors import DataError, MemadaptError


class ProfilerError(MemadaptError, ValueError):
    """Bad profiling arguments or an unusable catalog; the message says what to do instead."""


class ProfilerDataError(ProfilerError, DataError):
    """Evaluation data that is missing or unreadable: bad input (the CLI exits 2)."""
