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
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar, TypeVar

import numpy as np

from adaptive.errors import AdaptiveError
from adaptive.select import ModelDemand, select

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
        self.demands = tuple(demands)
        self.names = [d.model for d in self.demands]
        self.n = len(self.demands)
        self.mem = [[int(c.memory_bytes) for c in d.candidates] for d in self.demands]
        self.acc = [[float(c.accuracy) for c in d.candidates] for d in self.demands]
        self.lat = [[float(c.latency_s) for c in d.candidates] for d in self.demands]
        self.load_s = [[float(c.load_s) for c in d.candidates] for d in self.demands]
        self.floor = [float(d.floor) for d in self.demands]
        self.eligible: list[list[int]] = []
        self.ladder: list[list[int]] = []
        for d in self.demands:
            elig = [k for k, c in enumerate(d.candidates) if c.accuracy >= d.floor]
            self.eligible.append(elig)
            rung: list[int] = []
            for k in sorted(elig, key=lambda k, d=d: (d.candidates[k].memory_bytes,
                                                      -d.candidates[k].accuracy,
                                                      d.candidates[k].variant)):
                if not rung or d.candidates[k].accuracy > d.candidates[rung[-1]].accuracy:
                    rung.append(k)
            self.ladder.append(rung)
        #: smallest eligible memory per model (inf when nothing meets the floor)
        self.min_mem = [self.mem[m][r[0]] if r else math.inf
                        for m, r in enumerate(self.ladder)]
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
        mem = self.mem[m]
        for k in reversed(self.ladder[m]):
            if mem[k] <= limit:
                return k
        return -1

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

    Rates: each model keeps an exponentially decayed request count (time constant ``tau_s``),
    updated in O(1) per request; ``log(count) + t_last/tau`` orders models by current rate
    without touching the others, so the coldest resident is a ``min``.

    Plans: every ``tick_s`` the rates are compared with those of the last plan; when they
    drifted by more than ``hysteresis`` (L1, relative), or ``replan_s`` passed, or the budget
    changed, :func:`adaptive.select` (objective ``"misses"``: serve the most requests from
    memory, then the most accurate) gives each model a target variant. Re-plans are throttled
    to one per ``min_replan_s`` except on budget changes. A plan is applied to resident models
    only: downgrades at once, then upgrades (hottest first) into free memory, shrinking models
    the plan left out to their smallest variant to make room. A plan never evicts and never
    loads a model nobody asked for (no prefetching), so misses stay comparable with the
    demand-loading baselines.

    Misses: the requested model is loaded at the best variant that fits in free memory if that
    is at least its target (the smallest variant when it has none); otherwise residents are
    downgraded one step at a time, cheapest first (rate x accuracy lost per byte freed), to make
    room for the target or the best variant below it; only when every resident at its smallest
    variant still leaves too little room are the coldest residents evicted.
    """

    variant_aware = True

    def __init__(self, tau_s: float = 120.0, tick_s: float = 10.0, replan_s: float = 300.0,
                 min_replan_s: float = 30.0, hysteresis: float = 0.25,
                 exact: bool | None = None):
        for k, v in (("tau_s", tau_s), ("tick_s", tick_s)):
            if not v > 0:
                raise PolicyError(f"memadapt: {k} must be > 0, got {v!r}")
        if replan_s < 0 or min_replan_s < 0 or hysteresis < 0:
            raise PolicyError("memadapt: replan_s, min_replan_s and hysteresis must be >= 0")
        self.tau_s = float(tau_s)
        self.tick_s = float(tick_s)
        self.replan_s = float(replan_s)
        self.min_replan_s = float(min_replan_s)
        self.hysteresis = float(hysteresis)
        self.exact = exact

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        n = cache.n
        self._cnt = [0.0] * n
        self._last = [0.0] * n
        self._key = [-math.inf] * n  # log(decayed count) + t_last / tau
        # ladder position of each candidate (-1 when off the ladder) and ladder memory/accuracy
        self._pos_of = []
        self._lmem = []
        self._lacc = []
        self._step = []  # log(accuracy lost / bytes freed) stepping down from ladder pos k
        for m in range(n):
            lad = cache.ladder[m]
            pos = [-1] * len(cache.mem[m])
            for k, cand in enumerate(lad):
                pos[cand] = k
            self._pos_of.append(pos)
            lm = [cache.mem[m][k] for k in lad]
            la = [cache.acc[m][k] for k in lad]
            self._lmem.append(lm)
            self._lacc.append(la)
            self._step.append([math.inf] + [
                math.log(max(la[k] - la[k - 1], 1e-12) / max(lm[k] - lm[k - 1], 1))
                for k in range(1, len(lad))])
        self._target = [-1] * n  # ladder position the current plan wants, -1: none
        self._plan_rates: list[float] | None = None
        self._last_plan = -math.inf
        self._next_tick = self.tick_s
        self.replans = 0
        self.downgrades = 0
        self.upgrades = 0

    def stats(self) -> dict[str, float]:
        return {"replans": self.replans, "downgrades": self.downgrades,
                "upgrades": self.upgrades}

    # -- rates ---------------------------------------------------------------------------------

    def _seen(self, t: float, m: int) -> None:
        c = self._cnt[m] * math.exp((self._last[m] - t) / self.tau_s) + 1.0
        self._cnt[m] = c
        self._last[m] = t
        self._key[m] = math.log(c) + t / self.tau_s

    def rates(self, t: float) -> list[float]:
        """Current decayed request rate of every model (requests per second)."""
        tau = self.tau_s
        return [c * math.exp((last - t) / tau) / tau for c, last in zip(self._cnt, self._last)]

    def _tick(self, t: float) -> None:
        self._next_tick = (math.floor(t / self.tick_s) + 1) * self.tick_s
        if t - self._last_plan < self.min_replan_s:
            return
        rates = self.rates(t)
        old = self._plan_rates
        if old is None or t - self._last_plan >= self.replan_s:
            self._replan(t, rates)
            return
        total = sum(old)
        drift = sum(abs(a - b) for a, b in zip(rates, old))
        if drift > self.hysteresis * max(total, 1e-12):
            self._replan(t, rates)

    # -- protocol ------------------------------------------------------------------------------

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._seen(t, m)
        if t >= self._next_tick:
            self._tick(t)

    def on_miss(self, i: int, t: float, m: int) -> int:
        self._seen(t, m)
        if t >= self._next_tick:
            self._tick(t)
        return self._admit(t, m)

    def on_budget(self, t: float, budget: int) -> None:
        c = self.cache
        if c.used > budget:
            self._shed(t, 0, exclude=-1)
        self._replan(t, self.rates(t))

    # -- mechanics -----------------------------------------------------------------------------

    def _reclaimable(self, exclude: int) -> int:
        c = self.cache
        total = 0
        for r in c.resident:
            if r != exclude:
                total += c.mem[r][c.res[r]] - self._lmem[r][0]
        return total

    def _shed(self, t: float, need: int, exclude: int) -> None:
        """Free memory until ``need`` bytes are free: evict the coldest residents only as far as
        downgrading everyone else could not make room, then downgrade cheapest-first."""
        c = self.cache
        reclaim = self._reclaimable(exclude)
        key = self._key
        while c.budget - c.used + reclaim < need:
            victim = min((r for r in c.resident if r != exclude), key=key.__getitem__)
            reclaim -= c.mem[victim][c.res[victim]] - self._lmem[victim][0]
            c.evict(victim)
        self._downgrade_until(t, need, exclude)

    def _downgrade_until(self, t: float, need: int, exclude: int) -> bool:
        c = self.cache
        key, step, pos_of, lad = self._key, self._step, self._pos_of, c.ladder
        while c.budget - c.used < need:
            best, best_cost = -1, math.inf
            for r in c.resident:
                if r == exclude:
                    continue
                k = pos_of[r][c.res[r]]
                if k > 0:
                    cost = key[r] + step[r][k]
                    if cost < best_cost:
                        best, best_cost = r, cost
            if best < 0:
                return False
            c.swap(best, lad[best][pos_of[best][c.res[best]] - 1], t)
            self.downgrades += 1
        return True

    def _admit(self, t: float, m: int) -> int:
        c = self.cache
        lm = self._lmem[m]
        want = max(self._target[m], 0)
        free = c.budget - c.used
        kfree = -1
        for k in range(len(lm) - 1, -1, -1):
            if lm[k] <= free:
                kfree = k
                break
        if kfree < want:
            room = free + self._reclaimable(m)
            k = want
            while k > kfree and lm[k] > room:
                k -= 1
            if k < 0:  # even all others at their smallest leave too little: evict
                k = 0
                self._shed(t, lm[0], exclude=m)
            elif k > kfree:
                self._downgrade_until(t, lm[k], exclude=m)
            kfree = k
        v = c.ladder[m][kfree]
        c.load(m, v, t)
        return v

    def _replan(self, t: float, rates: list[float]) -> None:
        c = self.cache
        self._last_plan = t
        self._plan_rates = rates
        self.replans += 1
        demands = []
        for m, d in enumerate(c.demands):
            if c.min_mem[m] <= c.budget and rates[m] > 0:
                demands.append(replace(d, rate=rates[m]))
        resident = {c.names[r]: c.demands[r].candidates[c.res[r]].variant for r in c.resident
                    if c.min_mem[r] <= c.budget and rates[r] > 0}
        target = [-1] * c.n
        if demands:
            try:
                plan = select(demands, c.budget, objective="misses", exact=self.exact,
                              resident=resident)
            except AdaptiveError as e:  # keep serving on the old targets rather than fail
                log.warning("memadapt: re-plan at t=%.3f failed: %s", t, e)
                return
            index = {name: m for m, name in enumerate(c.names)}
            for name, variant in plan.choice.items():
                if variant is None:
                    continue
                m = index[name]
                cand = next(k for k, x in enumerate(c.demands[m].candidates)
                            if x.variant == variant)
                # a dominated choice maps to the ladder rung that is as small and as accurate
                k = self._pos_of[m][cand]
                if k < 0:
                    lm = self._lmem[m]
                    k = max(j for j in range(len(lm)) if lm[j] <= c.mem[m][cand])
                target[m] = k
        self._target = target
        self._apply(t, rates)

    def _apply(self, t: float, rates: list[float]) -> None:
        c = self.cache
        lad, pos_of, target = c.ladder, self._pos_of, self._target
        ups = []
        for r in list(c.resident):
            k = pos_of[r][c.res[r]]
            want = target[r]
            if want < 0:
                continue
            if want < k:
                c.swap(r, lad[r][want], t)
                self.downgrades += 1
            elif want > k:
                ups.append(r)
        if not ups:
            return
        spare = sorted((r for r in c.resident if target[r] < 0 and pos_of[r][c.res[r]] > 0),
                       key=self._key.__getitem__)
        for r in sorted(ups, key=rates.__getitem__, reverse=True):
            new = lad[r][target[r]]
            need = c.mem[r][new] - c.mem[r][c.res[r]]
            while c.budget - c.used < need and spare:
                s = spare.pop(0)
                c.swap(s, lad[s][0], t)
                self.downgrades += 1
            if c.budget - c.used >= need:
                c.swap(r, new, t)
                self.upgrades += 1
