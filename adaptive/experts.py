"""Which resident model to give up: eviction orders that learn from shadow caches.

No single order wins everywhere: recency (LRU) wins on bursty traffic, where a model asked for
now is asked for again soon; frequency per byte (GDSF-like: decayed request rate / bytes)
wins on shifting popularity, where recency evicts a hot model after one unlucky gap; long-run
frequency per byte (requests since the model was first seen, per second and byte) wins on
stable popularity, where a decayed count of a rarely asked model is mostly noise; a forecast
(``next``: Belady-Size on the predicted wait, one smoothed gap after the last request for a
model whose gaps are regular, the time since its last request otherwise) wins where models are
called on a timer, as a third of Azure Functions are (Shahrad et al., ATC'20). Like ARC and
LeCaR, :class:`EvictionExperts` runs one cheap *ghost* cache per order beside the real one
(model ids only, each at its smallest eligible size, under the same budget), counts each
ghost's misses with exponential decay, and ranks real residents by the order whose ghost has
missed least lately. Pure Python, O(1) per request for LRU and O(resident) per ghost eviction.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from adaptive.admission import Rates

__all__ = ["ORDERS", "EvictionExperts"]

#: the eviction orders the experts compare, in tie-break order
ORDERS = ("gdsf", "lru", "lfu", "next")
_LRU = ORDERS.index("lru")
#: the orders whose ghost gives up the resident with the lowest key (LRU pops its oldest)
_KEYED = tuple(k for k in range(len(ORDERS)) if k != _LRU)


class EvictionExperts:
    """Shadow caches, one per order in :data:`ORDERS`, over ``sizes`` (bytes per model; inf for
    a model that can never be resident). ``rates`` is the policy's own :class:`Rates` (the
    caller counts each request there first); ``half_life_s`` is how fast a ghost's misses are
    forgotten."""

    __slots__ = ("sizes", "rates", "half_life_s", "score", "last_t", "_lru", "_keyed", "_used",
                 "_logsize", "wins", "total", "first", "gap", "dev", "prev")

    def __init__(self, sizes: Sequence[float], rates: Rates, half_life_s: float = 600.0):
        self.sizes = [float(s) for s in sizes]
        self.rates = rates
        self.half_life_s = float(half_life_s)
        self.score = [0.0] * len(ORDERS)  # decayed ghost misses
        self.last_t = 0.0
        self._lru: OrderedDict[int, None] = OrderedDict()
        # the other ghosts give up the resident their order's key ranks lowest (_KEYED)
        self._keyed: dict[int, dict[int, None]] = {k: {} for k in _KEYED}
        self._used = [0.0] * len(ORDERS)  # bytes each ghost holds
        self.total = [0] * len(self.sizes)  # requests since first seen
        self.gap = [math.inf] * len(self.sizes)  # smoothed time between requests
        self.dev = [math.inf] * len(self.sizes)  # smoothed |gap - mean gap|
        self.prev = [0.0] * len(self.sizes)  # the latest request before this one
        self.first = [0.0] * len(self.sizes)
        self._logsize = [math.log(max(s, 1.0)) if math.isfinite(s) else math.inf
                         for s in self.sizes]
        self.wins = [0] * len(ORDERS)  # times each order ranked a real eviction

    def request(self, m: int, t: float, budget: float) -> None:
        """Request for model ``m`` at ``t`` under ``budget`` bytes: update every ghost."""
        size = self.sizes[m]
        if not self.total[m]:
            self.first[m] = t
        else:
            g = t - self.prev[m]
            if g >= 0:
                if self.gap[m] == math.inf:
                    self.gap[m] = g
                else:
                    d = abs(g - self.gap[m])
                    self.dev[m] = d if self.dev[m] == math.inf else 0.75 * self.dev[m] + 0.25 * d
                    self.gap[m] = 0.75 * self.gap[m] + 0.25 * g
        self.total[m] += 1
        self.prev[m] = max(self.prev[m], t)  # a clock read out of order moves nothing back
        if t > self.last_t:
            f = 0.5 ** ((t - self.last_t) / self.half_life_s)
            self.score = [s * f for s in self.score]
            self.last_t = t
        if size > budget:
            return
        lru, used = self._lru, self._used
        if m in lru:
            lru.move_to_end(m)
        else:
            self.score[_LRU] += 1.0
            lru[m] = None
            used[_LRU] += size
            while used[_LRU] > budget:
                v, _ = lru.popitem(last=False)
                used[_LRU] -= self.sizes[v]
        for k in _KEYED:
            ghost = self._keyed[k]
            if m not in ghost:
                self.score[k] += 1.0
                self._give_up(k, budget - size, t)
                ghost[m] = None
                used[k] += size

    def _key(self, k: int, t: float):
        """Order ``k``'s key at time ``t`` (smaller: given up first)."""
        order = ORDERS[k]
        if order == "lru":
            return self.rates.last.__getitem__
        if order == "lfu":
            return self._long_key(t)
        if order == "next":
            return self._next_key(t)
        key, ls = self.rates.key, self._logsize  # gdsf: decayed rate per byte
        return lambda r: key[r] - ls[r]

    def _give_up(self, k: int, budget: float, t: float) -> None:
        """Keyed ghost ``k`` gives up residents, lowest key first, until it holds <= budget."""
        ghost, used, sizes = self._keyed[k], self._used, self.sizes
        if used[k] <= budget or not ghost:
            return
        key = self._key(k, t)
        while used[k] > budget and ghost:
            v = min(ghost, key=key)
            del ghost[v]
            used[k] -= sizes[v]

    def _long_key(self, t: float):
        """Long-run requests per second and byte (smaller: given up first)."""
        total, first, sizes, tau = self.total, self.first, self.sizes, self.rates.tau_s
        return lambda r: total[r] / (max(t - first[r], tau) * sizes[r])

    def _next_key(self, t: float):
        """Predicted wait for the next request times bytes, negated (Belady-Size on a
        forecast: the next request is due one smoothed gap after the last for a model whose
        gaps are regular; for any other model, one asked for fewer than three times or one
        overdue, the wait is taken as the time since its last request, i.e. recency;
        smaller: given up first)."""
        last, gap, dev, sizes = self.rates.last, self.gap, self.dev, self.sizes

        def key(r: int) -> float:
            g = gap[r]
            wait = last[r] + g - t
            if g == math.inf or dev[r] > 0.25 * g or wait < 0:
                wait = t - last[r]  # not periodic (or overdue): recency
            return -wait * sizes[r]
        return key

    def shrink(self, budget: float) -> None:
        """The budget dropped: the ghosts give up what no longer fits, each in its order."""
        used = self._used
        while used[_LRU] > budget and self._lru:
            v, _ = self._lru.popitem(last=False)
            used[_LRU] -= self.sizes[v]
        for k in _KEYED:
            self._give_up(k, budget, self.last_t)

    def order(self) -> int:
        """Index into :data:`ORDERS` of the order whose ghost missed least lately."""
        return min(range(len(ORDERS)), key=self.score.__getitem__)

    def victim(self, candidates: Sequence[int] | dict[int, None]) -> int:
        """The model among ``candidates`` (non-empty) the winning order gives up first."""
        self.wins[self.order()] += 1
        return self.peek(candidates)

    def peek(self, candidates: Sequence[int] | dict[int, None]) -> int:
        """:meth:`victim` without counting it as an eviction."""
        return min(candidates, key=self._key(self.order(), self.last_t))
