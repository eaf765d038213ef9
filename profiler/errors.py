"""The profiler's error type."""

from __future__ import annotations

from variants.errors import MemadaptError


class ProfilerError(MemadaptError, ValueError):
    """Bad profiling arguments or an unusable catalog; the message says what to do instead."""
