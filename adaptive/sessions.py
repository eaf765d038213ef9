"""Loaded sessions as the cache holds them, and errors handed between threads.

An :class:`Entry` is one loaded session of one variant with its ledger hold and the count of
requests running on it. A retired entry serves no new request; the requests already on it
finish there, and the last one out releases it (its bytes come back only then).
"""

from __future__ import annotations

import copy
from typing import Any

from adaptive.errors import AdaptiveError
from adaptive.ledger import Hold
from adaptive.select import Candidate

__all__ = ["Entry", "fresh"]


class Entry:
    """One loaded session of one variant; ``inflight`` requests are running on it."""

    __slots__ = ("model", "cand", "session", "hold", "inflight", "retired", "releasing")

    def __init__(self, model: str, cand: Candidate, session: Any, hold: Hold):
        self.model = model
        self.cand = cand
        self.session = session
        self.hold = hold  # private bytes and the shared groups, in the ledger
        self.inflight = 0
        self.retired = False
        self.releasing = False

    @property
    def charge(self) -> int:
        return self.hold.private


def fresh(err: BaseException) -> BaseException:
    """A new exception like ``err`` for another thread to raise (one exception object raised
    in many threads gets its traceback rewritten by each)."""
    try:
        new = copy.copy(err)
    except Exception:  # noqa: BLE001 - any error type: fall back to the message
        new = AdaptiveError(str(err))
    new.__cause__ = err
    return new
