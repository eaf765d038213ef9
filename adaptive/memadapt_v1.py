"""memadapt's first rules, which :class:`adaptive.VariantCache` still runs (see
:mod:`adaptive.admission`): kept as a policy so a replay can check the cache against the
simulator decision for decision, and so the benchmark shows what the current rules gained.
"""

from __future__ import annotations

import numpy as np

from adaptive.admission import (
    Move,
    Rates,
    ReplanSchedule,
    admit,
    apply_targets,
    plan_targets,
    shed,
    worth_applying,
)
from adaptive.cachestate import CacheState
from adaptive.policy_base import Policy, PolicyError, register_policy

__all__ = ["MemAdaptV1Policy"]


@register_policy("memadapt-v1")
class MemAdaptV1Policy(Policy):
    """The rules :class:`adaptive.VariantCache` runs today: downgrade residents before
    evicting anything, re-plan towards :func:`adaptive.select`'s targets.

    ``memadapt replay`` compares the real cache with this policy, decision for decision.
    Its decisions assume a swap releases and reserves at once, so here every swap breaks
    before it makes (requests that arrive during it stall); the real cache makes before it
    breaks when both variants fit.

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
    ablation = True

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
                    c.swap(m, v, t, "bbm")
                else:
                    self.upgrades += 1
                    c.swap(m, v, t, "bbm")

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
