"""The policies memadapt is measured against: whole-model caching, INFaaS, offline Belady-Size.

Whole-model policies (random, lru, lfu, loadtime, cremebrulee) hold each model at its "base":
the most accurate eligible variant (or, when that alone exceeds the budget, the most accurate
eligible one that fits, so they serve whatever can be served at all) and differ only in the
model they give up (cachetools' split). ``infaas`` chooses the variant it loads; ``belady`` is
the offline reference. Two ablations of memadapt live here too, because they are these
mechanisms with one part of memadapt swapped in: ``memadapt-whole`` (memadapt's eviction
order over whole models, no downgrades) and ``infaas-experts`` (INFaaS's variant choice with
memadapt's eviction order).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np

from adaptive.admission import Rates
from adaptive.cachestate import CacheState
from adaptive.experts import EvictionExperts
from adaptive.policy_base import Policy, PolicyError, register_policy

__all__ = [
    "BeladySizePolicy", "CremeBruleePolicy", "INFaaSPolicy", "LFUPolicy", "LRUPolicy",
    "LoadTimePolicy", "RandomPolicy", "WholeModelPolicy",
]


def fastest_eligible(c: CacheState, m: int, limit: float) -> int:
    """INFaaS's choice: the eligible candidate of ``m`` within ``limit`` bytes with the lowest
    ``load_s + latency_s`` (ties: more accurate, then smaller), or -1."""
    return next((k for k in c.by_speed[m] if c.mem[m][k] <= limit), -1)


class WholeModelPolicy(Policy):
    """Load :meth:`choose`'s variant on a miss, evicting :meth:`victim` until it fits."""

    def on_hit(self, i: int, t: float, m: int) -> None:
        self.requested(i, t, m)

    def on_miss(self, i: int, t: float, m: int) -> int:
        self.requested(i, t, m)
        c = self.cache
        v = self.choose(m)
        need = c.mem[m][v]
        while c.budget - c.used < need:
            self._evict(self.victim(t))
        c.load(m, v, t)
        self.loaded(m)
        return v

    def on_budget(self, t: float, budget: int) -> None:
        c = self.cache
        while c.used > budget:
            self._evict(self.victim(t))

    def _evict(self, m: int) -> None:
        self.cache.evict(m)
        self.forget(m)

    def choose(self, m: int) -> int:
        """The candidate to load for a miss of ``m``: its base (see the module docstring)."""
        c = self.cache
        return c.best_fit(m, c.budget)

    def victim(self, t: float) -> int:
        """The resident model to give up next."""
        raise NotImplementedError

    def requested(self, i: int, t: float, m: int) -> None:
        """Bookkeeping for request ``i`` (hit or miss, before any eviction it causes)."""

    def loaded(self, m: int) -> None:
        """Bookkeeping after ``m`` was loaded."""

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

    def loaded(self, m: int) -> None:
        self._pos[m] = len(self._items)
        self._items.append(m)

    def forget(self, m: int) -> None:
        k = self._pos.pop(m)
        last = self._items.pop()
        if last != m:
            self._items[k] = last
            self._pos[last] = k


class _LRUOrder(WholeModelPolicy):
    """Recency bookkeeping shared by lru and infaas."""

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._order: OrderedDict[int, None] = OrderedDict()

    def requested(self, i: int, t: float, m: int) -> None:
        if m in self._order:
            self._order.move_to_end(m)

    def victim(self, t: float) -> int:
        return next(iter(self._order))

    def loaded(self, m: int) -> None:
        self._order[m] = None

    def forget(self, m: int) -> None:
        del self._order[m]


@register_policy("lru")
class LRUPolicy(_LRUOrder):
    """Evict the least recently used model (Ray Serve multiplexing, ModelMesh)."""


class _Counted(WholeModelPolicy):
    """Request counts since the start, shared by lfu and cremebrulee."""

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._count = [0] * cache.n

    def requested(self, i: int, t: float, m: int) -> None:
        self._count[m] += 1


@register_policy("lfu")
class LFUPolicy(_Counted):
    """Evict the resident model with the fewest requests so far ("popularity")."""

    def victim(self, t: float) -> int:
        return min(self.cache.resident, key=self._count.__getitem__)


@register_policy("cremebrulee")
class CremeBruleePolicy(_Counted):
    """CremeBrulee (Ogden et al., ACSOS'21): evict the lowest ``frequency * load_s / size``.

    The BeladyMIN-derived utility keeps models that are asked for often and are expensive to
    bring back per byte they occupy.
    """

    def victim(self, t: float) -> int:
        c = self.cache
        cnt = self._count

        def utility(r: int) -> float:
            v = c.res[r]
            return cnt[r] * c.load_s[r][v] / max(c.mem[r][v], 1)

        return min(c.resident, key=utility)


@register_policy("loadtime")
class LoadTimePolicy(WholeModelPolicy):
    """Evict the resident model that is cheapest to load again."""

    def victim(self, t: float) -> int:
        c = self.cache
        return min(c.resident, key=lambda r: c.load_s[r][c.res[r]])


@register_policy("belady")
class BeladySizePolicy(WholeModelPolicy):
    """Offline Belady-Size over each model's *smallest eligible* variant: evict the resident
    whose next request is furthest away times its bytes (never again: first).

    The classic size-aware offline heuristic (Berger et al. 2018 use it as their reference
    policy), holding the variant that costs least, since any resident variant avoids a miss.
    It is a strong reference, not a bound: :func:`adaptive.bounds.miss_lower_bound` is. An
    execution cache cannot serve a request without the model in memory, so there is no
    bypass: a miss always loads.
    """

    offline = True
    variant_aware = True

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        if future is None:
            raise PolicyError("belady is an offline oracle: the simulator must pass future=")
        f = np.asarray(future, dtype=np.int64)
        n = len(f)
        self._never = n + 1
        nxt = np.full(n, self._never, dtype=np.int64)
        order = np.lexsort((np.arange(n), f))
        same = f[order][1:] == f[order][:-1]
        nxt[order[:-1][same]] = order[1:][same]
        self._nxt = nxt.tolist()
        self._next_use = [self._never] * cache.n
        self._i = 0

    def requested(self, i: int, t: float, m: int) -> None:
        self._next_use[m] = self._nxt[i]
        self._i = i

    def choose(self, m: int) -> int:
        return self.cache.ladder[m][0]

    def victim(self, t: float) -> int:
        c, nu, i, never = self.cache, self._next_use, self._i, self._never

        def cost(r: int) -> tuple[int, int]:
            d, b = nu[r], c.mem[r][c.res[r]]
            return (1, b) if d == never else (0, (d - i) * b)

        return max(c.resident, key=cost)


@register_policy("infaas")
class INFaaSPolicy(_LRUOrder):
    """INFaaS (Romero et al., ATC'21): serve with the loaded variant meeting the floor if there
    is one, else load the eligible variant with the lowest ``load_s + latency_s``; evict LRU.

    Variant-aware in *which* variant it loads, but it never changes what is resident.
    """

    variant_aware = True

    def choose(self, m: int) -> int:
        c = self.cache
        return fastest_eligible(c, m, c.budget)


class _ExpertOrder(WholeModelPolicy):
    """memadapt's eviction order (:class:`~adaptive.experts.EvictionExperts`) for ablations."""

    def __init__(self, tau_s: float = 120.0, half_life_s: float = 600.0):
        self.tau_s = float(tau_s)
        self.half_life_s = float(half_life_s)

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        self._rates = Rates(cache.n, self.tau_s)
        self._experts = EvictionExperts(cache.min_mem, self._rates, self.half_life_s)

    def requested(self, i: int, t: float, m: int) -> None:
        self._rates.seen(m, t)
        self._experts.request(m, t, self.cache.budget)

    def on_budget(self, t: float, budget: int) -> None:
        self._experts.shrink(budget)
        super().on_budget(t, budget)

    def victim(self, t: float) -> int:
        return self._experts.victim(self.cache.resident)


@register_policy("memadapt-whole")
class MemAdaptWholePolicy(_ExpertOrder):
    """Ablation: memadapt's eviction order over whole models (the base variant; no
    downgrades, no upgrades) -- what the order alone is worth."""

    ablation = True


@register_policy("infaas-experts")
class INFaaSExpertsPolicy(_ExpertOrder):
    """Ablation: INFaaS's variant choice (fastest eligible) with memadapt's eviction order --
    what memadapt adds beyond a better order."""

    ablation = True
    variant_aware = True

    def choose(self, m: int) -> int:
        c = self.cache
        return fastest_eligible(c, m, c.budget)
