"""How a :class:`~adaptive.cache.VariantCache` is configured: one frozen, validated object.

Everything that is a *setting* lives here; what is *injected* (candidates, the loader, the
clock, an audit hook) is passed to the cache beside it. ``VariantCache(store, config)`` is
the documented form; ``VariantCache(store, budget="512MiB", policy="lru")`` is shorthand for
``VariantCache(store, CacheConfig(budget="512MiB", policy="lru"))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from adaptive.errors import AdaptiveError

__all__ = ["CacheConfig", "config_from"]


def _positive(name: str, v: Any, *, none_ok: bool = False) -> None:
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise AdaptiveError(f"{name} must be > 0 seconds{' or None' if none_ok else ''}, "
                            f"got {v!r}")


@dataclass(frozen=True)
class CacheConfig:
    """Settings of one variant cache (see :class:`~adaptive.cache.VariantCache`).

    **Where and what**: ``device`` (``cpu``, ``cuda[:i]``), ``backend`` (a registered
    backend), ``max_batch`` (memory is charged at this batch size; larger batches are
    refused), ``floors`` (model -> accuracy floor), ``slos`` (model -> latency SLO in
    seconds: a variant slower than it is not chosen while one that meets it fits),
    ``aliases`` (served model -> stored base), ``verify`` (check files against their sha256
    once, at construction).

    **Budget**: ``budget`` is bytes, a size string, a source name (``"cgroup"``,
    ``"cuda-free"``), a function or a :class:`~adaptive.budget.BudgetSource`; None: free CUDA
    memory on ``cuda``, the cgroup limit on ``cpu``. ``budget_poll_s``: how often the
    background thread reads a dynamic source. ``charge_load_peak``: a load is charged its
    profiled load peak while it loads (the steady size after), so the process's memory stays
    under the budget during loads too.

    **Policy**: ``policy`` names a registered policy (``memadapt``, ``infaas``, ``lru``,
    ``cremebrulee``, ... see :func:`adaptive.policies.list_policies`), the same decisions the
    simulator makes, driven by the cache's requests and budget; ``policy_options`` are its
    options. ``memadapt-v1`` runs the re-planning rules of :mod:`adaptive.admission`, the one
    policy that plans with shared groups and whose knobs are ``objective``, ``hysteresis``,
    ``ewma_halflife_s``, ``rebalance_interval_s``, ``prefetch`` and ``schedule``.

    **Waits and threads**: every wait (for a load, a drain, memory) ends after
    ``wait_timeout_s`` with an error naming the model and what it waited for.
    ``swap_workers`` threads make swaps and loads the policy asks for besides a request's own
    load (0: the request that caused them makes them, after its own result: deterministic,
    as :func:`adaptive.replay.replay` needs). ``threads``: intra-op threads per session.
    ``trace_clock``: the injected clock is a trace's (it does not advance while a load runs,
    as in a replay): a request arriving, on that clock, before the load it needs would have
    ended counts as waiting for it (:attr:`~adaptive.cache.InferResult.queued_s`).

    **Memory**: ``keep_host_bytes`` keeps what a re-load needs in host memory (the host
    tier). Without ``host_budget`` its bytes are charged to the budget (on CPU it is the same
    RAM) and dropped before any load waits for memory; with ``host_budget`` (bytes or a size)
    it has a bound of its own and is not charged. ``share_weights`` hosts variants in one
    tensor pool, each shared tensor charged once. ``pin_allocator`` (CPU, off by default:
    it is a process-wide setting) pins glibc's mmap threshold as the profiler did.
    """

    device: str = "cpu"
    backend: str = "onnxruntime"
    budget: Any = None
    floors: Mapping[str, float] = field(default_factory=dict)
    slos: Mapping[str, float] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    max_batch: int = 8
    policy: str = "memadapt"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    objective: str = "misses"
    hysteresis: float = 0.1
    ewma_halflife_s: float = 30.0
    rebalance_interval_s: float | None = None
    prefetch: bool = True
    schedule: Any = None
    budget_poll_s: float = 1.0
    wait_timeout_s: float = 60.0
    swap_workers: int = 1
    threads: int | None = None
    keep_host_bytes: bool = False
    host_budget: Any = None
    share_weights: bool = False
    charge_load_peak: bool = True
    pin_allocator: bool = False
    verify: bool = True
    trace_clock: bool = False

    def __post_init__(self) -> None:
        from adaptive.admission import ReplanSchedule
        from adaptive.select import OBJECTIVES
        from variants.backends import list_backends, parse_device, supports_pool
        from variants.errors import BackendError

        try:
            parse_device(self.device)
        except BackendError as e:
            raise AdaptiveError(str(e)) from None
        if self.backend not in list_backends():
            raise AdaptiveError(f"unknown backend {self.backend!r}; known: "
                                f"{', '.join(list_backends())}")
        mb = self.max_batch
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise AdaptiveError(f"max_batch must be an int >= 1, got {mb!r}")
        if self.objective not in OBJECTIVES:
            raise AdaptiveError(f"unknown objective {self.objective!r}; choose one of "
                                f"{OBJECTIVES}")
        _positive("ewma_halflife_s", self.ewma_halflife_s)
        _positive("budget_poll_s", self.budget_poll_s)
        _positive("wait_timeout_s", self.wait_timeout_s)
        _positive("rebalance_interval_s", self.rebalance_interval_s, none_ok=True)
        h = self.hysteresis
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not h >= 0:
            raise AdaptiveError(f"hysteresis must be >= 0 (a fraction of the current utility), "
                                f"got {h!r}")
        w = self.swap_workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise AdaptiveError(f"swap_workers must be an int >= 0, got {w!r}")
        if self.schedule is not None and not isinstance(self.schedule, ReplanSchedule):
            raise AdaptiveError(f"schedule must be an adaptive.admission.ReplanSchedule or "
                                f"None, got {self.schedule!r}")
        if self.keep_host_bytes and self.backend != "onnxruntime":
            raise AdaptiveError(f"keep_host_bytes needs the onnxruntime backend (it re-opens "
                                f"sessions from host bytes), not {self.backend!r}")
        if self.host_budget is not None and not self.keep_host_bytes:
            raise AdaptiveError("host_budget bounds the host tier; pass keep_host_bytes=True "
                                "too")
        if self.share_weights and not supports_pool(self.backend):
            raise AdaptiveError(f"share_weights needs a backend that loads through a shared "
                                f"tensor pool (torch), not {self.backend!r}")
        self._check_policy()
        for model, slo in dict(self.slos).items():
            if isinstance(slo, bool) or not isinstance(slo, (int, float)) or not (
                    slo > 0 and math.isfinite(slo)):
                raise AdaptiveError(f"slos[{model!r}] must be a latency SLO in seconds > 0, "
                                    f"got {slo!r}")
        for name in ("floors", "slos", "aliases", "policy_options"):
            v = getattr(self, name)
            if not isinstance(v, Mapping):
                raise AdaptiveError(f"{name} must be a mapping, got {v!r}")
            object.__setattr__(self, name, MappingProxyType(dict(v)))

    def _check_policy(self) -> None:
        from adaptive.policies import list_policies, policy_class

        if self.policy not in list_policies():
            raise AdaptiveError(f"unknown policy {self.policy!r}; known: "
                                f"{', '.join(list_policies())}")
        if policy_class(self.policy).offline:
            raise AdaptiveError(f"policy {self.policy!r} is offline (it needs the future "
                                f"trace); a cache can run only online policies")

    @property
    def replans(self) -> bool:
        """Whether the cache runs :mod:`adaptive.admission`'s re-planning rules natively."""
        return self.policy == "memadapt-v1"

    def host_budget_bytes(self) -> int | None:
        """``host_budget`` in bytes (None: the tier is charged to the budget)."""
        if self.host_budget is None:
            return None
        from adaptive.units import parse_size

        try:
            return parse_size(self.host_budget)
        except ValueError as e:
            raise AdaptiveError(f"host_budget: {e}") from None

    def with_(self, **changes: Any) -> CacheConfig:
        """A copy with ``changes`` (unknown names: the error lists the settings)."""
        return config_from(self, changes)


_FIELDS = None


def config_from(config: CacheConfig | None, overrides: Mapping[str, Any]) -> CacheConfig:
    """``config`` (default: ``CacheConfig()``) with ``overrides`` applied."""
    global _FIELDS
    if _FIELDS is None:
        _FIELDS = frozenset(f.name for f in fields(CacheConfig))
    if config is not None and not isinstance(config, CacheConfig):
        raise AdaptiveError(f"config must be an adaptive.CacheConfig, got {config!r}")
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise AdaptiveError(f"unknown cache settings {unknown}; CacheConfig has "
                            f"{', '.join(sorted(_FIELDS))}")
    maps = ("floors", "slos", "aliases", "policy_options")
    overrides = {k: ({} if v is None and k in maps else v) for k, v in overrides.items()}
    if config is None:
        return CacheConfig(**overrides)
    return replace(config, **overrides) if overrides else config
