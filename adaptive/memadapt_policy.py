"""memadapt's policy: serve every model that fits at its smallest variant, and buy accuracy
only with memory no model needs.

The rules, each there because a measured failure asked for it (``benchmarks/policies.py``):

* **Misses** load the eligible variant that is fastest to bring in and run (INFaaS's choice):
  every request that arrives while a model loads waits and is a miss too, so the shortest load
  misses least, and a model whose SLO some variant meets only ever loads such a variant.
* **Room** for a miss (or a budget drop) is taken in order of what it costs: first loads
  under way beside a serving variant are abandoned (free), then upgraded residents step down
  break-before-make, the one whose requests are least likely to arrive during the smaller
  variant's load first (expected stalls ``rate x load_s`` per byte freed), and only when every
  resident is at its smallest are models evicted, in the order of
  :class:`~adaptive.experts.EvictionExperts` (recency or frequency per byte, whichever has
  missed less lately on shadow caches).
* **Upgrades** are make-before-break (the old variant serves while the new one loads, both
  charged), so they never make a request wait; they spend only memory the *working set* does
  not need: every ``tick_s`` the plan reserves the smallest variant of each model asked for in
  the last ``window_s`` seconds that is not resident (it will be back), and
  :func:`adaptive.select` (objective ``misses``) gives the resident models the most accurate
  variants that fit in the rest, hottest first. Downgrades the plan wants are
  make-before-break too; urgent ones come from the room rule above.

Rates are exponentially decayed request counts (time constant ``tau_s``), the same
:class:`~adaptive.admission.Rates` the cache uses.
"""

from __future__ import annotations

import math

import numpy as np

from adaptive.admission import Rates, plan_choice
from adaptive.baselines import fastest_eligible
from adaptive.cachestate import CacheState
from adaptive.experts import ORDERS, EvictionExperts
from adaptive.policy_base import Policy, PolicyError, register_policy

__all__ = ["MemAdaptPolicy"]


@register_policy("memadapt")
class MemAdaptPolicy(Policy):
    """Variant-aware caching: downgrade before evicting, upgrade only into spare memory.

    See the module docstring for the rules. Options: ``tau_s`` (rate time constant),
    ``tick_s`` (how often the upgrade plan is made), ``window_s`` (how long a model not asked
    for stays in the working set the plan reserves memory for), ``half_life_s`` (how fast the
    eviction experts forget their misses).
    """

    variant_aware = True

    def __init__(self, tau_s: float = 120.0, tick_s: float = 10.0, window_s: float = 900.0,
                 half_life_s: float = 600.0, exact: bool | None = None):
        for k, v in (("tau_s", tau_s), ("tick_s", tick_s), ("window_s", window_s),
                     ("half_life_s", half_life_s)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise PolicyError(f"memadapt: {k} must be > 0 seconds, got {v!r}")
        self.tau_s = float(tau_s)
        self.tick_s = float(tick_s)
        self.window_s = float(window_s)
        self.half_life_s = float(half_life_s)
        self.exact = exact

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        c = cache
        self._lad = c.ladders
        self._rates = Rates(c.n, self.tau_s)
        self._experts = EvictionExperts(c.min_mem, self._rates, self.half_life_s)
        self._ever = [False] * c.n
        self._next_plan = self.tick_s
        self.replans = 0
        self.downgrades = 0
        self.upgrades = 0
        self.urgent_downgrades = 0
        self.cancelled = 0

    def stats(self) -> dict[str, float]:
        w = self._experts.wins
        return {"replans": self.replans, "downgrades": self.downgrades,
                "upgrades": self.upgrades, "urgent_downgrades": self.urgent_downgrades,
                "cancelled_loads": self.cancelled,
                **{f"evictions_by_{o}": w[k] for k, o in enumerate(ORDERS)}}

    # -- protocol ------------------------------------------------------------------------------

    def _seen(self, m: int, t: float) -> None:
        self._rates.seen(m, t)
        self._ever[m] = True
        self._experts.request(m, t, self.cache.budget)

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._seen(m, t)
        if t >= self._next_plan:
            self._plan(t)

    def on_miss(self, i: int, t: float, m: int) -> int:
        self._seen(m, t)
        c = self.cache
        v = fastest_eligible(c, m, c.budget)
        self._make_room(c.mem[m][v], t, exclude=m)
        c.load(m, v, t)
        if t >= self._next_plan:
            self._plan(t)
        return v

    def on_budget(self, t: float, budget: int) -> None:
        self._experts.shrink(budget)
        self._make_room(0, t, exclude=-1)
        self._plan(t)

    # -- room ----------------------------------------------------------------------------------

    def _make_room(self, need: int, t: float, exclude: int) -> None:
        """Free memory until ``need`` bytes fit: abandon side loads, then step upgraded
        residents down break-before-make (fewest expected stalls per byte first), then evict
        in the experts' order."""
        c = self.cache
        if c.free >= need:
            return
        rates = self._rates
        pending = sorted((r for r in c.resident if c.pend[r] >= 0 and r != exclude),
                         key=rates.key.__getitem__)
        for r in pending:
            if c.free >= need:
                return
            c.cancel(r)
            self.cancelled += 1
        lad = self._lad
        while c.free < need:
            best, best_cost, best_v = -1, math.inf, -1
            short = need - c.free
            for r in c.resident:
                if r == exclude:
                    continue
                cur = c.res[r]
                pos = lad.pos_of[r][cur]
                if pos <= 0:
                    continue
                # the highest rung that frees enough, else the smallest
                rungs = lad.ladder[r]
                v = rungs[0]
                for k in range(pos - 1, -1, -1):
                    if c.mem[r][cur] - c.mem[r][rungs[k]] >= short:
                        v = rungs[k]
                        break
                freed = c.mem[r][cur] - c.mem[r][v]
                cost = rates.rate(r, t) * c.load_s[r][v] / max(freed, 1)
                if cost < best_cost:
                    best, best_cost, best_v = r, cost, v
            if best < 0:
                break
            c.swap(best, best_v, t, "bbm")
            self.urgent_downgrades += 1
        while c.free < need:
            victims = [r for r in c.resident if r != exclude]
            if not victims:
                break
            c.evict(self._experts.victim(victims))

    # -- upgrades ------------------------------------------------------------------------------

    def _plan(self, t: float) -> None:
        c, lad = self.cache, self._lad
        self._next_plan = (math.floor(t / self.tick_s) + 1) * self.tick_s
        self.replans += 1
        resident = list(c.resident)
        if not resident:
            return
        last, ever, horizon = self._rates.last, self._ever, t - self.window_s
        reserve = sum(lad.min_mem[m] for m in range(c.n)
                      if ever[m] and m not in c.resident and last[m] >= horizon
                      and lad.min_mem[m] <= c.budget)
        floor_bytes = sum(lad.lmem[r][0] for r in resident)
        budget = max(int(c.budget - reserve), floor_bytes)
        now = self._rates.rates(t)
        rates = [0.0] * c.n
        for r in resident:
            rates[r] = max(now[r], 1e-12)
        # plan on what each model will hold once its side load completes
        held = [c.pend[m] if c.pend[m] >= 0 else c.res[m] for m in range(c.n)]
        choice = plan_choice(lad, rates, held, resident, budget, objective="misses",
                             exact=self.exact)
        if choice is None:
            return
        downs, ups = [], []
        for r in resident:
            want = choice[r]
            if want < 0:
                continue
            cur = held[r]
            if c.mem[r][want] < c.mem[r][cur]:
                downs.append((r, want))
            elif c.mem[r][want] > c.mem[r][cur] and c.acc[r][want] > c.acc[r][cur]:
                ups.append((r, want))
        for r, want in downs:
            if c.free >= c.mem[r][want]:
                c.swap(r, want, t, "mbb")
                self.downgrades += 1
        ups.sort(key=lambda x: -rates[x[0]])
        for r, want in ups:
            if c.pend[r] < 0 and c.free >= c.mem[r][want]:
                c.swap(r, want, t, "mbb")
                self.upgrades += 1
