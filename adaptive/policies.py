"""Caching policies for the trace simulator: whole-model baselines and variant-aware memadapt.

A policy decides *what* is resident; :class:`CacheState` is the only thing that moves bytes, so
the two invariants the project promises -- never above the budget, at most one variant per
model -- are enforced in one place whatever a policy does (cachetools' split: policies differ
only in what they give up).

The simulator drives a policy with three calls:

* ``on_hit(i, t, m)``: request ``i`` at time ``t`` for model ``m``, which is resident. The
  policy updates its bookkeeping; it may swap ``m`` to another variant but must not evict it.
* ``on_miss(i, t, m) -> v``: ``m`` is not resident; the policy makes room and loads a variant
  ``v`` of ``m`` that meets the floor, and returns it. The simulator has already checked that
  some eligible variant fits an empty cache (otherwise the request is rejected).
* ``on_budget(t, budget)``: the budget changed (``cache.budget`` is already the new value);
  the policy must shed memory until ``cache.used <= budget`` before returning.

Whole-model policies (random, lru, lfu, loadtime, belady, cremebrulee) hold each model at its
"base": the most accurate variant meeting the floor (or, when the base alone exceeds the budget,
the most accurate eligible one that fits, so they serve whatever can be served at all).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from adaptive.admission import (
    Ladders,
    Move,
    Rates,
    ReplanSchedule,
    admit,
    apply_targets,
    plan_targets,
    shed,
    worth_applying,
)
from adaptive.errors import AdaptiveError
from adaptive.select import ModelDemand

log = logging.getLogger(__name__)


class PolicyError(AdaptiveError, ValueError):
    """A policy name or option is not valid."""


class CacheInvariantError(AdaptiveError, AssertionError):
    """A policy tried to break the cache's invariants (over budget, two variants, ...).

    A subclass of AssertionError because it is a bug in the policy, not in the caller's input;
    it is raised explicitly (not with ``assert``) so ``python -O`` keeps the check.
    """


class CacheState:
    """What is resident, per model one candidate index or -1, and the bytes it takes.

    Per-model profile numbers are kept as plain lists of lists: the simulator touches them once
    per request and list indexing is several times cheaper than numpy scalar access.
    ``ladder[m]`` lists the candidate indices of ``m`` that meet the floor and are not dominated
    (no other eligible variant is as small and as accurate), ordered by memory, so walking it
    downward is a sequence of downgrades that each free memory and cost accuracy.
    """

    def __init__(self, demands: Sequence[ModelDemand], budget: int):
        lad = Ladders(demands)
        #: the static facts the variant-aware decisions use (see :mod:`adaptive.admission`)
        self.ladders = lad
        self.demands = lad.demands
        self.names = lad.names
        self.n = lad.n
        self.mem = lad.mem
        self.acc = lad.acc
        self.lat = [[float(c.latency_s) for c in d.candidates] for d in self.demands]
        self.load_s = [[float(c.load_s) for c in d.candidates] for d in self.demands]
        self.floor = [float(d.floor) for d in self.demands]
        self.eligible = lad.eligible
        self.ladder = lad.ladder
        #: smallest eligible memory per model (inf when nothing meets the floor)
        self.min_mem = lad.min_mem
        self.res = [-1] * self.n
        self.ready_at = [0.0] * self.n
        self.resident: dict[int, None] = {}  # insertion-ordered set of resident models
        self.used = 0
        self.peak = 0
        self.budget = int(budget)
        self.loads = 0
        self.evictions = 0
        self.swaps = 0

    def best_fit(self, m: int, limit: float) -> int:
        """The most accurate eligible candidate of ``m`` taking at most ``limit`` bytes, or -1."""
        return self.ladders.best_fit(m, limit)

    @property
    def free(self) -> int:
        return self.budget - self.used

    def load(self, m: int, v: int, t: float) -> None:
        """Make variant ``v`` of a non-resident model resident; usable from ``t + load_s``."""
        if self.res[m] >= 0:
            raise CacheInvariantError(f"load {self.names[m]!r}: already resident as candidate "
                                      f"{self.res[m]}; swap instead (one variant per model)")
        used = self.used + self.mem[m][v]
        if used > self.budget:
            raise CacheInvariantError(f"load {self.names[m]!r} ({self.mem[m][v]} bytes) would use "
                                      f"{used} bytes, over the budget of {self.budget}")
        self.used = used
        if used > self.peak:
            self.peak = used
        self.res[m] = v
        self.ready_at[m] = t + self.load_s[m][v]
        self.resident[m] = None
        self.loads += 1

    def evict(self, m: int) -> None:
        """Drop model ``m`` from memory."""
        v = self.res[m]
        if v < 0:
            raise CacheInvariantError(f"evict {self.names[m]!r}: not resident")
        self.used -= self.mem[m][v]
        self.res[m] = -1
        del self.resident[m]
        self.evictions += 1

    def swap(self, m: int, v: int, t: float) -> None:
        """Replace resident ``m``'s variant by ``v``.

        The old variant's memory is released and the new one's reserved at once; the new
        variant is usable from ``t + load_s[v]`` (a request before that waits for it).
        """
        cur = self.res[m]
        if cur < 0:
            raise CacheInvariantError(f"swap {self.names[m]!r}: not resident; load it")
        if cur == v:
            return
        used = self.used - self.mem[m][cur] + self.mem[m][v]
        # a downgrade while shedding after a budget drop is still over budget, but shrinks
        if used > self.budget and used > self.used:
            raise CacheInvariantError(f"swap {self.names[m]!r} to candidate {v} would use {used} "
                                      f"bytes, over the budget of {self.budget}")
        self.used = used
        if used > self.peak:
            self.peak = used
        self.res[m] = v
        self.ready_at[m] = t + self.load_s[m][v]
        self.swaps += 1


class Policy:
    """Base class: see the module docstring for the protocol."""

    name: ClassVar[str] = ""
    #: offline policies are given the whole future trace in :meth:`reset`
    offline: ClassVar[bool] = False
    #: whether the policy chooses among variants (not just the base) -- for reports
    variant_aware: ClassVar[bool] = False

    cache: CacheState

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        """Start a run. ``future[i]`` is request ``i``'s model index (offline policies only)."""
        self.cache = cache

    def on_hit(self, i: int, t: float, m: int) -> None:
        """Request ``i`` for resident model ``m``."""

    def on_miss(self, i: int, t: float, m: int) -> int:
        """Load some eligible variant of non-resident ``m`` and return its candidate index."""
        raise NotImplementedError

    def on_budget(self, t: float, budget: int) -> None:
        """Shed memory until ``cache.used <= budget``."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Policy-specific counters for the result (e.g. re-plans)."""
        return {}


P = TypeVar("P", bound=type[Policy])
_POLICIES: dict[str, type[Policy]] = {}


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator: make a :class:`Policy` subclass available to :func:`get_policy`."""

    def deco(cls: P) -> P:
        if name in _POLICIES:
            raise PolicyError(f"policy {name!r} is already registered by "
                              f"{_POLICIES[name].__qualname__}")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return deco


def list_policies() -> list[str]:
    """Names accepted by :func:`get_policy`."""
    return sorted(_POLICIES)


def get_policy(name: str, **kw: Any) -> Policy:
    """A fresh policy instance; ``kw`` are the policy's options."""
    cls = _POLICIES.get(name)
    if cls is None:
        raise PolicyError(f"unknown policy {name!r}; known policies: {', '.join(list_policies())}")
    try:
        return cls(**kw)
    except TypeError as e:
        raise PolicyError(f"policy {name!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Whole-model baselines


class WholeModelPolicy(Policy):
    """Load the base variant on a miss, evicting :meth:`victim` until it fits."""

    def on_miss(self, i: int, t: float, m: int) -> int:
        c = self.cache
        v = c.best_fit(m, c.budget)
        need = c.mem[m][v]
        while c.budget - c.used < need:
            self._evict(self.victim(t))
        c.load(m, v, t)
        self.loaded(i, t, m)
        return v

    def on_budget(self, t: float, budget: int) -> None:
        c = self.cache
        while c.used > budget:
            self._evict(self.victim(t))

    def _evict(self, m: int) -> None:
        self.cache.evict(m)
        self.forget(m)

    def victim(self, t: float) -> int:
        """The resident model to give up next."""
        raise NotImplementedError

    def loaded(self, i: int, t: float, m: int) -> None:
        """Bookkeeping after ``m`` was loaded for request ``i``."""
        self.on_hit(i, t, m)

    def forget(self, m: int) -> None:
        """Bookkeeping after ``m`` was evicted."""


@register_policy("random")
class RandomPolicy(WholeModelPolicy):
    """Evict a uniformly random resident model (seeded): the floor any policy must beat."""

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._rng = random.Random(seed)
        self._items: list[int] = []
        self._pos: dict[int, int] = {}

    def victim(self, t: float) -> int:
        return self._items[self._rng.randrange(len(self._items))]

    def loaded(self, i: int, t: float, m: int) -> None:
        self._pos[m] = len(self._items)
        self._items.append(m)

    def forget(self, m: int) -> None:
        k = self._pos.pop(m)
        last = self._items.pop()
        if last != m:
            self._items[k] = last
            self._pos[last] = k


class _LRUOrder(Policy):
    """Recency bookkeeping shared by lru and infaas."""

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._order: OrderedDict[int, None] = OrderedDict()
        self._touch = self._order.move_to_end

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._touch(m)

    def victim(self, t: float) -> int:
        return next(iter(self._order))

    def loaded(self, i: int, t: float, m: int) -> None:
        self._order[m] = None

    def forget(self, m: int) -> None:
        del self._order[m]


@register_policy("lru")
class LRUPolicy(_LRUOrder, WholeModelPolicy):
    """Evict the least recently used model (Ray Serve multiplexing, ModelMesh)."""


@register_policy("lfu")
class LFUPolicy(WholeModelPolicy):
    """Evict the resident model with the fewest requests so far ("popularity")."""

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._count = [0] * cache.n

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._count[m] += 1

    def victim(self, t: float) -> int:
        return min(self.cache.resident, key=self._count.__getitem__)


@register_policy("loadtime")
class LoadTimePolicy(WholeModelPolicy):
    """Evict the resident model that is cheapest to load again."""

    def victim(self, t: float) -> int:
        c = self.cache
        return min(c.resident, key=lambda r: c.load_s[r][c.res[r]])

    def loaded(self, i: int, t: float, m: int) -> None:
        pass


@register_policy("belady")
class BeladyPolicy(WholeModelPolicy):
    """Offline MIN: evict the resident model whose next request is furthest in the future.

    Optimal for equal-size models and a fixed budget; with unequal sizes it is the classic
    reference, not a bound.
    """

    offline = True

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        if future is None:
            raise PolicyError("belady is an offline oracle: the simulator must pass future=")
        f = np.asarray(future, dtype=np.int64)
        n = len(f)
        nxt = np.full(n, n, dtype=np.int64)  # n: never again
        order = np.lexsort((np.arange(n), f))
        same = f[order][1:] == f[order][:-1]
        nxt[order[:-1][same]] = order[1:][same]
        self._nxt = nxt.tolist()
        self._next_use = [n] * cache.n

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._next_use[m] = self._nxt[i]

    def victim(self, t: float) -> int:
        return max(self.cache.resident, key=self._next_use.__getitem__)


@register_policy("cremebrulee")
class CremeBruleePolicy(WholeModelPolicy):
    """CremeBrulee (Ogden et al., ACSOS'21): evict the lowest ``frequency * load_s / size``.

    The BeladyMIN-derived utility keeps models that are asked for often and are expensive to
    bring back per byte they occupy.
    """

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._count = [0] * cache.n

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._count[m] += 1

    def victim(self, t: float) -> int:
        c = self.cache
        cnt = self._count

        def utility(r: int) -> float:
            v = c.res[r]
            return cnt[r] * c.load_s[r][v] / max(c.mem[r][v], 1)

        return min(c.resident, key=utility)


@register_policy("infaas")
class INFaaSPolicy(_LRUOrder, WholeModelPolicy):
    """INFaaS (Romero et al., ATC'21): serve with a loaded variant meeting the floor if there is
    one, else load the eligible variant with the lowest ``load_s + latency_s``; evict LRU.

    Variant-aware in *which* variant it loads, but it never downgrades what is resident.
    """

    variant_aware = True

    def on_miss(self, i: int, t: float, m: int) -> int:
        c = self.cache
        fits = [k for k in c.eligible[m] if c.mem[m][k] <= c.budget]
        v = min(fits, key=lambda k: (c.load_s[m][k] + c.lat[m][k], -c.acc[m][k], c.mem[m][k]))
        while c.budget - c.used < c.mem[m][v]:
            self._evict(self.victim(t))
        c.load(m, v, t)
        self.loaded(i, t, m)
        return v


# ---------------------------------------------------------------------------------------------
# memadapt


@register_policy("memadapt")
class MemAdaptPolicy(Policy):
    """Variant-aware caching: downgrade residents before evicting anything.

    The decisions are :mod:`adaptive.admission`'s, the same that :class:`adaptive.VariantCache`
    makes (so a replay of a trace through both can be compared), summarised here:

    Rates: each model keeps an exponentially decayed request count (time constant ``tau_s``).

    Plans: every ``tick_s`` the rates are compared with those of the last plan; when they
    drifted by more than ``hysteresis`` (L1, relative), or ``replan_s`` passed, or the budget
    changed, :func:`adaptive.select` (objective ``"misses"``: serve the most requests from
    memory, then the most accurate) gives each model a target variant. Re-plans are throttled
    to one per ``min_replan_s`` except on budget changes. A plan is applied to resident models
    only when the residency it leads to serves more (by more than the fraction ``gain``):
    downgrades at once, then upgrades (hottest first) into free memory, shrinking models the
    plan left out to their smallest variant to make room. A plan never evicts and, unless
    ``prefetch``, never loads a model nobody asked for, so misses stay comparable with the
    demand-loading baselines.

    Misses: the requested model is loaded at the best variant that fits in free memory if that
    is at least its target (the smallest variant when it has none); otherwise residents are
    downgraded one step at a time, cheapest first (rate x accuracy lost per byte freed), to make
    room for the target or the best variant below it; only when every resident at its smallest
    variant still leaves too little room are the coldest residents evicted.
    """

    variant_aware = True

    def __init__(self, tau_s: float = 120.0, tick_s: float = 10.0, replan_s: float = 300.0,
                 min_replan_s: float = 30.0, hysteresis: float = 0.25, gain: float = 0.0,
                 prefetch: bool = False, exact: bool | None = None):
        for k, v in (("tau_s", tau_s), ("tick_s", tick_s)):
            if not v > 0:
                raise PolicyError(f"memadapt: {k} must be > 0, got {v!r}")
        if replan_s < 0 or min_replan_s < 0 or hysteresis < 0 or gain < 0:
            raise PolicyError("memadapt: replan_s, min_replan_s, hysteresis and gain must be "
                              ">= 0")
        self.tau_s = float(tau_s)
        self.gain = float(gain)
        self.prefetch = bool(prefetch)
        self.exact = exact
        #: when request arrivals re-plan; a VariantCache given it re-plans the same way
        self.schedule = ReplanSchedule(tick_s=float(tick_s), min_interval_s=float(min_replan_s),
                                       max_interval_s=float(replan_s), drift=float(hysteresis))

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._lad = cache.ladders
        self._rates = Rates(cache.n, self.tau_s)
        self._seen = self._rates.seen
        self._timer = self.schedule.timer()
        self._target = [-1] * cache.n  # ladder rung the current plan wants, -1: none
        self.replans = 0
        self.downgrades = 0
        self.upgrades = 0

    def stats(self) -> dict[str, float]:
        return {"replans": self.replans, "downgrades": self.downgrades,
                "upgrades": self.upgrades}

    def rates(self, t: float) -> list[float]:
        """Current decayed request rate of every model (requests per second)."""
        return self._rates.rates(t)

    # -- protocol ------------------------------------------------------------------------------

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._seen(m, t)
        if self._timer.due(t):
            self._tick(t)

    def on_miss(self, i: int, t: float, m: int) -> int:
        self._seen(m, t)
        if self._timer.due(t):
            self._tick(t)
        c = self.cache
        moves, v = admit(self._lad, m, c.res, c.resident, c.budget - c.used, self._rates.key,
                         self._target[m])
        self._do(moves, t)
        c.load(m, v, t)
        return v

    def on_budget(self, t: float, budget: int) -> None:
        c = self.cache
        self._do(shed(self._lad, c.res, c.resident, budget - c.used, self._rates.key), t)
        self._replan(t, self.rates(t))

    # -- mechanics -----------------------------------------------------------------------------

    def _tick(self, t: float) -> None:
        rates = self._timer.check(t, lambda: self._rates.rates(t))
        if rates is not None:
            self._replan(t, rates)

    def _do(self, moves: list[Move], t: float) -> None:
        c = self.cache
        lmem, pos_of = self._lad.lmem, self._lad.pos_of
        for mv in moves:
            m, v = mv.model, mv.variant
            if v < 0:
                c.evict(m)
            elif c.res[m] < 0:
                c.load(m, v, t)
            else:
                if lmem[m][pos_of[m][v]] < lmem[m][pos_of[m][c.res[m]]]:
                    self.downgrades += 1
                else:
                    self.upgrades += 1
                c.swap(m, v, t)

    def _replan(self, t: float, rates: list[float]) -> None:
        c = self.cache
        self._timer.planned(t, rates)
        self.replans += 1
        target = plan_targets(self._lad, rates, c.res, c.resident, c.budget, objective="misses",
                              exact=self.exact)
        if target is None:  # keep serving on the old targets rather than fail
            return
        self._target = target
        moves = apply_targets(self._lad, target, c.res, c.resident, c.budget - c.used, rates,
                              self._rates.key, prefetch=self.prefetch)
        if moves and worth_applying(self._lad, c.res, c.resident, moves, rates,
                                    hysteresis=self.gain, objective="misses"):
            self._do(moves, t)
