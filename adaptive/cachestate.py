"""What a simulated cache holds, byte for byte, and the only code that moves those bytes.

Policies decide; :class:`CacheState` carries the decisions out and enforces the invariants the
project promises whatever a policy does: at most one *serving* variant per model, and what is
charged never above the budget at any instant.

Swap semantics (the same the real :class:`~adaptive.cache.VariantCache` uses):

* **make-before-break** (``mode="mbb"``): the new variant loads beside the old one, which keeps
  serving; both are charged until the load completes, then the old one is released. No request
  waits. The memory it frees (a downgrade) is free only once the load is done.
* **break-before-make** (``mode="bbm"``): the old variant is released at once and the new one
  charged; requests for the model wait until the new one is loaded. Each request that waits
  for such a swap is a **stall**.
* a **load** (the model had nothing resident): requests wait for it; each is a **miss**
  (including those that arrive while it is still loading: a load a request waits for is a
  miss).

Pending make-before-break loads complete lazily: :meth:`settle` is called with the current
time before every request and budget change, which is exact because completion only releases
memory and nothing is decided between events.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from adaptive.admission import Ladders
from adaptive.errors import AdaptiveError
from adaptive.select import ModelDemand, is_downgrade

__all__ = ["SWAP_MODES", "CacheInvariantError", "CacheState"]

SWAP_MODES = ("mbb", "bbm")


class CacheInvariantError(AdaptiveError, AssertionError):
    """A policy tried to break the cache's invariants (over budget, two variants, ...).

    A subclass of AssertionError because it is a bug in the policy, not in the caller's input;
    it is raised explicitly (not with ``assert``) so ``python -O`` keeps the check.
    """


class CacheState:
    """What is resident, per model one serving candidate index or -1, and the bytes charged.

    Per-model profile numbers are kept as plain lists of lists: the simulator touches them once
    per request and list indexing is several times cheaper than numpy scalar access.
    ``ladder[m]`` lists the candidate indices of ``m`` that are eligible (meet the floor, and
    the SLO where one can be met) and are not dominated, ordered by memory.

    ``res[m]`` serves (or, while ``ready_at[m]`` is in the future, is being loaded; ``stalling``
    says whether that wait is a break-before-make swap or a load); ``pend[m]`` is a variant
    loading beside it (make-before-break), ready at ``pend_at[m]``.
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
        #: each model's eligible candidates, fastest to bring in and run first (ties: more
        #: accurate, then smaller): what INFaaS loads on a miss
        self.by_speed = [sorted(e, key=lambda k, m=m: (self.load_s[m][k] + self.lat[m][k],
                                                       -self.acc[m][k], self.mem[m][k]))
                         for m, e in enumerate(self.eligible)]
        self.ladder = lad.ladder
        #: smallest eligible memory per model (inf when nothing meets the floor)
        self.min_mem = lad.min_mem
        self.res = [-1] * self.n
        self.ready_at = [0.0] * self.n
        self.stalling = [False] * self.n
        self.pend = [-1] * self.n
        self.pend_at = [math.inf] * self.n
        self._heap: list[tuple[float, int, int]] = []
        #: a load waiting for a model's make-before-break downgrade: downgrading model ->
        #: (waiting model, its candidate, bytes charged for it meanwhile)
        self.succ: dict[int, tuple[int, int, int]] = {}
        #: bytes charged for a waiting load until it starts (waiting model -> bytes)
        self.queued: dict[int, int] = {}
        self.resident: dict[int, None] = {}  # insertion-ordered set of resident models
        self.used = 0
        self.peak = 0
        self.budget = int(budget)
        self.loads = 0
        self.evictions = 0
        self.swaps = 0
        self.cancels = 0
        self.bytes_loaded = 0
        #: the time of the latest event: callers set it (or :meth:`settle` does) before each
        #: request and budget change, so an evict without a time happens then
        self.now = 0.0
        # swaps carried out, by direction (see :attr:`downgrades`), and the break-before-make
        # ones still loading: model -> (ready time, old candidate, new candidate)
        self._swapped = [0, 0]
        self._switching: dict[int, tuple[float, int, int]] = {}

    # -- queries ---------------------------------------------------------------------------

    def best_fit(self, m: int, limit: float) -> int:
        """The most accurate eligible candidate of ``m`` taking at most ``limit`` bytes, or -1."""
        return self.ladders.best_fit(m, limit)

    @property
    def downgrades(self) -> int:
        """Swaps carried out to a smaller (or, as large, less accurate) variant: what a real
        cache counts when it switches a model to its new variant. A make-before-break swap
        counts once its load completes (not when cancelled), a break-before-make one unless
        the model is evicted or swapped again before its load completes."""
        return self._swapped[0] + sum(self._down(m, old, new)
                                      for m, (_, old, new) in self._switching.items())

    @property
    def upgrades(self) -> int:
        """Swaps carried out to a larger (or more accurate) variant; see :attr:`downgrades`."""
        return self._swapped[1] + sum(not self._down(m, old, new)
                                      for m, (_, old, new) in self._switching.items())

    @property
    def free(self) -> int:
        return self.budget - self.used

    def charged(self, m: int) -> int:
        """Bytes model ``m`` holds now (its serving variant plus one loading beside it; for a
        load waiting for memory, what is set aside for it)."""
        if m in self.queued:
            return self.queued[m]
        b = self.mem[m][self.res[m]] if self.res[m] >= 0 else 0
        if self.pend[m] >= 0:
            b += self.mem[m][self.pend[m]]
        return b

    def audit(self) -> None:
        """Recompute the charged bytes from the residency; raise if the ledger disagrees or
        is over the budget (tests call it after every step)."""
        total = sum(self.charged(m) for m in self.resident)
        if total != self.used:
            raise CacheInvariantError(f"ledger says {self.used} bytes, residency {total}")
        if total > self.budget:
            raise CacheInvariantError(f"{total} bytes charged over the budget of {self.budget}")

    # -- moves -----------------------------------------------------------------------------

    def _charge(self, delta: int, what: str, shrink_ok: bool = False) -> None:
        used = self.used + delta
        if used > self.budget and not (shrink_ok and delta <= 0):
            raise CacheInvariantError(f"{what} would use {used} bytes, over the budget of "
                                      f"{self.budget}")
        self.used = used
        if used > self.peak:
            self.peak = used

    def settle(self, t: float) -> None:
        """Complete every make-before-break load that is done by ``t``."""
        if t > self.now:
            self.now = t
        heap = self._heap
        while heap and heap[0][0] <= t:
            at, m, v = heapq.heappop(heap)
            if self.pend[m] != v or self.pend_at[m] != at:
                continue  # cancelled or replaced
            self._leaving(m, at)
            self._switched(m, self.res[m], v)
            self.used -= self.mem[m][self.res[m]]
            self.res[m] = v
            self.ready_at[m] = at
            self.stalling[m] = False
            self.pend[m] = -1
            self.pend_at[m] = math.inf
            self._start_waiting(m, at, on_time=True)

    def _down(self, m: int, old: int, new: int) -> bool:
        cands = self.demands[m].candidates
        return is_downgrade(cands[new], cands[old])

    def _switched(self, m: int, old: int, new: int) -> None:
        self._swapped[0 if self._down(m, old, new) else 1] += 1

    def _leaving(self, m: int, t: float | None) -> None:
        """``m``'s variant changes again (or goes) at ``t``: a break-before-make swap to it
        counts if its load had completed by then."""
        if t is not None and t > self.now:
            self.now = t
        sw = self._switching.pop(m, None)
        if sw is not None and sw[0] <= (self.now if t is None else t):
            self._switched(m, sw[1], sw[2])

    def _start_waiting(self, a: int, t: float, on_time: bool) -> None:
        """Model ``a``'s downgrade freed its memory at ``t``: the load waiting for it starts
        (it keeps its planned ready time when it starts on time)."""
        nxt = self.succ.pop(a, None)
        if nxt is None:
            return
        w, v, promised = nxt
        del self.queued[w]
        self.used += self.mem[w][v] - promised
        if not on_time:
            self.ready_at[w] = t + self.load_s[w][v]
        if self.used > self.peak:
            self.peak = self.used

    def load(self, m: int, v: int, t: float, after: int = -1) -> None:
        """Make variant ``v`` of a non-resident model resident; usable from ``t + load_s``.

        With ``after``, a model whose make-before-break downgrade is under way: the load
        starts when that downgrade completes and takes the memory it frees (so nobody
        stalls; ``m``'s requests wait for both); the bytes the freed memory does not cover
        are charged now."""
        if self.res[m] >= 0:
            raise CacheInvariantError(f"load {self.names[m]!r}: already resident as candidate "
                                      f"{self.res[m]}; swap instead (one variant per model)")
        if after >= 0:
            a = after
            p = self.pend[a]
            if p < 0 or self.mem[a][p] >= self.mem[a][self.res[a]] or a in self.succ:
                raise CacheInvariantError(f"load {self.names[m]!r} after {self.names[a]!r}: "
                                          f"that model has no downgrade under way to wait for")
            promised = max(0, self.mem[m][v] - self.mem[a][self.res[a]])
            self._charge(promised, f"load {self.names[m]!r} after {self.names[a]!r}")
            self.succ[a] = (m, v, promised)
            self.queued[m] = promised
            start = self.pend_at[a]
        else:
            self._charge(self.mem[m][v], f"load {self.names[m]!r} ({self.mem[m][v]} bytes)")
            start = t
        self.res[m] = v
        self.ready_at[m] = start + self.load_s[m][v]
        self.stalling[m] = False
        self.resident[m] = None
        self.loads += 1
        self.bytes_loaded += self.mem[m][v]

    def cancel(self, m: int) -> None:
        """Abandon model ``m``'s make-before-break load, if any (its bytes come back)."""
        p = self.pend[m]
        if p >= 0:
            if m in self.succ:
                raise CacheInvariantError(f"cancel {self.names[m]!r}: a load waits for its "
                                          f"downgrade; swap it break-before-make instead")
            self.used -= self.mem[m][p]
            self.pend[m] = -1
            self.pend_at[m] = math.inf
            self.cancels += 1

    def evict(self, m: int, t: float | None = None) -> None:
        """Drop model ``m`` from memory (and anything loading for it). ``t`` is needed when a
        load waits for ``m``'s downgrade: it starts at ``t`` instead."""
        v = self.res[m]
        if v < 0:
            raise CacheInvariantError(f"evict {self.names[m]!r}: not resident")
        self._leaving(m, t)
        if m in self.queued:  # a load still waiting for memory: drop it
            a = next(a for a, (w, _, _) in self.succ.items() if w == m)
            del self.succ[a]
            self.used -= self.queued.pop(m)
            self.res[m] = -1
            del self.resident[m]
            self.evictions += 1
            return
        if m in self.succ:  # its memory goes now: the load waiting for it starts now
            if t is None:
                raise CacheInvariantError(f"evict {self.names[m]!r}: a load waits for it; "
                                          f"pass the time")
            self.used -= self.mem[m][v]
            self.used -= self.mem[m][self.pend[m]]
            self.pend[m] = -1
            self.pend_at[m] = math.inf
            self.res[m] = -1
            del self.resident[m]
            self.evictions += 1
            self._start_waiting(m, t, on_time=False)
            return
        self.cancel(m)
        self.used -= self.mem[m][v]
        self.res[m] = -1
        del self.resident[m]
        self.evictions += 1

    def swap(self, m: int, v: int, t: float, mode: str = "mbb") -> None:
        """Replace resident ``m``'s variant by ``v``, make-before-break or break-before-make
        (see the module docstring). A swap to the variant already loading beside it in
        ``bbm`` mode breaks the old one and waits for the rest of that load."""
        cur = self.res[m]
        if cur < 0:
            raise CacheInvariantError(f"swap {self.names[m]!r}: not resident; load it")
        if m in self.queued:
            raise CacheInvariantError(f"swap {self.names[m]!r}: its load has not started")
        if m in self.succ and not (mode == "bbm" and self.pend[m] == v):
            raise CacheInvariantError(f"swap {self.names[m]!r}: a load waits for its "
                                      f"downgrade; only breaking the old variant is allowed")
        if mode == "mbb":
            if self.pend[m] == v:
                return
            self.cancel(m)
            if cur == v:
                return
            self._charge(self.mem[m][v], f"make-before-break swap of {self.names[m]!r} to "
                                         f"candidate {v}")
            self.swaps += 1
            self.bytes_loaded += self.mem[m][v]
            at = t + self.load_s[m][v]
            if at <= t and self.ready_at[m] <= t:  # nothing to load: switch now
                self._leaving(m, t)
                self._switched(m, cur, v)
                self.used -= self.mem[m][cur]
                self.res[m] = v
                return
            self.pend[m] = v
            self.pend_at[m] = at
            heapq.heappush(self._heap, (at, m, v))
            return
        if mode != "bbm":
            raise CacheInvariantError(f"unknown swap mode {mode!r}; one of {SWAP_MODES}")
        if self.pend[m] == v:  # break the old one, keep the load already under way
            at = self.pend_at[m]
            self.pend[m] = -1
            self.pend_at[m] = math.inf
            self.used -= self.mem[m][cur]
            self._start_waiting(m, t, on_time=False)
        else:
            self.cancel(m)
            if cur == v:
                return
            self._charge(self.mem[m][v] - self.mem[m][cur],
                         f"break-before-make swap of {self.names[m]!r} to candidate {v}",
                         shrink_ok=True)
            self.swaps += 1
            self.bytes_loaded += self.mem[m][v]
            at = t + self.load_s[m][v]
        waiting_load = self.ready_at[m] > t and not self.stalling[m]
        self._leaving(m, t)
        self._switching[m] = (max(at, t), cur, v)
        self.res[m] = v
        self.ready_at[m] = max(at, t)
        # requests already waiting for a cold load keep waiting for a load (misses)
        self.stalling[m] = not waiting_load and at > t
