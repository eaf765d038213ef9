"""What :class:`~adaptive.cache.VariantCache` answers with: a served request's result, the
cache's counters, and the error for a model it does not serve."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adaptive.errors import AdaptiveError

__all__ = ["CacheStats", "InferResult", "ModelStats", "UnknownModelError"]


class UnknownModelError(AdaptiveError, KeyError):
    """``infer`` named a model the cache does not serve."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class InferResult:
    """One served request: the output and which variant produced it.

    ``cold`` is True when the model was not resident when the request arrived (it waited for
    a load: a miss, or, with ``stalled``, for a break-before-make swap); ``latency_s`` is the
    wall time of the whole ``infer`` call, waiting included.
    """

    output: Any
    model: str
    variant: str
    cold: bool
    latency_s: float
    stalled: bool = False
    #: with ``CacheConfig.trace_clock`` (a replay's clock, which does not advance while a
    #: load runs): how long the request would have waited, in real time, for a load that on
    #: that clock ended after it arrived; else 0
    queued_s: float = 0.0


@dataclass(frozen=True)
class ModelStats:
    """One model's residency and service so far (``memory_bytes``: what its resident variant
    is charged beyond the shared groups it uses)."""

    model: str
    variant: str | None
    floor: float
    accuracy: float | None
    served_accuracy: float | None
    requests: int
    hits: int
    memory_bytes: int
    rate: float


@dataclass(frozen=True)
class CacheStats:
    """Counters since construction and the state now.

    ``requests = hits + misses + stalls + failures``: a hit ran on a resident variant at once,
    a miss waited for a load first, a stall for a break-before-make swap, a failure raised.
    ``cold_loads`` counts loads that requests triggered (one per load however many requests
    waited on it), ``prefetches`` loads the policy made for models not requested.
    ``host_bytes`` is the host tier. ``bytes_resident`` is everything charged (sessions, loads
    in progress, draining sessions, the host tier when it shares the budget), each shared
    group once (``shared_bytes``).
    """

    requests: int
    hits: int
    misses: int
    failures: int
    cold_loads: int
    prefetches: int
    downgrades: int
    upgrades: int
    evictions: int
    rebalances: int
    bytes_resident: int
    budget_bytes: int
    host_bytes: int
    models: Mapping[str, ModelStats]
    shared_bytes: int = 0
    stalls: int = 0
    policy: str = ""

    @property
    def swaps(self) -> int:
        """Downgrades plus upgrades."""
        return self.downgrades + self.upgrades
