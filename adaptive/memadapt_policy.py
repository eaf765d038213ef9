"""memadapt's policy: serve every model that fits at its smallest variant, and buy accuracy
only with memory no model needs.

The rules, each there because a measured failure asked for it (``benchmarks/policies.py``):

* **Misses** load the eligible variant that is fastest to bring in and run (INFaaS's choice):
  every request that arrives while a model loads waits and is a miss too, so the shortest load
  misses least, and a model whose SLO some variant meets only ever loads such a variant.
* **Room** for a miss (or a budget drop) is taken in order of what it costs: first loads
  under way beside a serving variant are abandoned (free); then, step by step, whichever is
  expected to cost less per byte of the room still wanted (bytes freed beyond it buy
  nothing): an upgraded resident steps down break-before-make (its requests that arrive
  during the smaller variant's load stall, and until the next plan can step it back up its
  requests lose the accuracy it gave up: ``rate x (load_s + tick_s x accuracy lost)``), or a
  resident is evicted (it misses if it comes back within ``window_s``, ``1 -
  exp(-long_run_rate x window_s)``; when it does, the requests that arrive while its fastest
  variant loads miss too and it serves that variant until the next plan, the cost of a step
  down to it on top of the miss, so a hot model is stepped down rather than evicted to come
  straight back), chosen in the order of :class:`~adaptive.experts.EvictionExperts`
  (recency, decayed or long-run frequency per byte, or a forecast of the next request,
  whichever has missed least lately on shadow caches). With ``defer``, a miss may instead
  wait for a hotter model's make-before-break downgrade (nobody stalls; within the SLO when
  it has one) -- off by default: room is needed when memory is full, so that downgrade
  rarely fits, and on the benchmark its knock-on effects cost more than it saved.
* **Upgrades** are make-before-break (the old variant serves while the new one loads, both
  charged), so they never make a request wait; they spend only memory the *working set* does
  not need: every ``tick_s`` the plan reserves the smallest variant of each model that is not
  resident and was asked for in the last ``window_s`` seconds (it will be back) or, in a run's
  first ``window_s``, not yet at all (it will come); :func:`adaptive.select` (objective
  ``misses``) gives the resident models the most accurate variants that fit in the rest,
  hottest first. A model just loaded starts its best variant that fits in that spare memory
  beside the first. Downgrades the plan wants are make-before-break too; urgent ones come
  from the room rule above.
* **Priced upgrades**: where that reserve leaves nothing to spend (the working set does not
  fit at its smallest variants), an upgrade may still take memory from it if the accuracy it
  buys per second is at least ``price`` times the misses per second that memory would avoid.
  That miss price is measured, not guessed: a second set of eviction ghosts runs at
  ``(1 - probe)`` of the budget (a miniature simulation, as in Waldspurger et al., ATC'17),
  and the misses it makes beyond the ghosts at the full budget, per byte of ``probe x
  budget``, are the marginal misses of memory taken from the working set. Upgrades are bought
  densest first (request rate x accuracy gained per byte), up to ``probe x budget`` in all,
  which is as far as the probe measures. A hot model's cheap upgrade then outweighs keeping
  room for a model asked for once in a while: on the Azure-like traces, where a few models
  take most requests, this is what the whole-model policies had won effective accuracy with.

Rates are exponentially decayed request counts (time constant ``tau_s``), the same
:class:`~adaptive.admission.Rates` the cache uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from adaptive.admission import Rates, plan_choice
from adaptive.baselines import fastest_eligible
from adaptive.cachestate import CacheState
from adaptive.experts import ORDERS, EvictionExperts
from adaptive.policy_base import Policy, PolicyError, register_policy

__all__ = ["MemAdaptConfig", "MemAdaptPolicy"]


@dataclass(frozen=True)
class MemAdaptConfig:
    """memadapt's options, validated on construction (a bad value is a :class:`PolicyError`
    that says what a good one is).

    * ``tau_s``: the time constant of the decayed request rates;
    * ``tick_s``: how often the upgrade plan is made;
    * ``window_s``: how long a model not asked for stays in the working set the plan reserves
      memory for;
    * ``half_life_s``: how fast the eviction experts forget their misses;
    * ``defer``: misses may wait for a hotter model's make-before-break downgrade;
    * ``reserve_unseen``: keep room for models not seen yet in a run's first ``window_s``;
    * ``price``: how many times the accuracy an upgrade buys must outweigh the misses the
      memory it takes from the working set would avoid;
    * ``probe``: the share of the budget the miss price is measured over and priced upgrades
      may take (0: no priced upgrades);
    * ``exact``: passed to :func:`adaptive.select` (None: exact where it is cheap).
    """

    tau_s: float = 120.0
    tick_s: float = 10.0
    window_s: float = 900.0
    half_life_s: float = 600.0
    defer: bool = False
    reserve_unseen: bool = True
    price: float = 5.0
    probe: float = 0.03
    exact: bool | None = None

    def __post_init__(self) -> None:
        for k in ("tau_s", "tick_s", "window_s", "half_life_s"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise PolicyError(f"memadapt: {k} must be > 0 seconds, got {v!r}")
            object.__setattr__(self, k, float(v))
        if not (isinstance(self.price, (int, float)) and self.price > 0):
            raise PolicyError(f"memadapt: price must be > 0 (times the misses an upgrade's "
                              f"memory would avoid), got {self.price!r}")
        if not (isinstance(self.probe, (int, float)) and 0 <= self.probe < 1):
            raise PolicyError(f"memadapt: probe must be a share of the budget in [0, 1) "
                              f"(0 turns priced upgrades off), got {self.probe!r}")
        for k in ("defer", "reserve_unseen"):
            if not isinstance(getattr(self, k), bool):
                raise PolicyError(f"memadapt: {k} must be true or false, got "
                                  f"{getattr(self, k)!r}")
        if self.exact is not None and not isinstance(self.exact, bool):
            raise PolicyError(f"memadapt: exact must be true, false or None, got {self.exact!r}")
        object.__setattr__(self, "price", float(self.price))
        object.__setattr__(self, "probe", float(self.probe))


@register_policy("memadapt")
class MemAdaptPolicy(Policy):
    """Variant-aware caching: downgrade before evicting, upgrade only into spare memory.

    See the module docstring for the rules. Options are the fields of
    :class:`MemAdaptConfig`, given as a ``config``, as keywords (``get_policy("memadapt",
    price=3)``), or both (keywords override the config's fields).
    """

    variant_aware = True

    def __init__(self, config: MemAdaptConfig | None = None, **options: Any):
        known = {f.name for f in fields(MemAdaptConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PolicyError(f"memadapt: unknown option(s) {', '.join(unknown)}; "
                              f"options are {', '.join(sorted(known))}")
        self.config = replace(config or MemAdaptConfig(), **options)

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        super().reset(cache, seed=seed)
        c = cache
        self._lad = c.ladders
        self._rates = Rates(c.n, self.config.tau_s)
        self._experts = EvictionExperts(c.min_mem, self._rates, self.config.half_life_s)
        # the same ghosts at (1 - probe) of the budget: the misses memory taken away would cost
        self._probe = (EvictionExperts(c.min_mem, self._rates, self.config.half_life_s)
                       if self.config.probe > 0 else None)
        self._ever = [False] * c.n
        self._first = [0.0] * c.n
        self._slo = [d.slo_s for d in c.demands]
        self._count = [0] * c.n
        self._next_plan = self.config.tick_s
        self.replans = 0
        self.downgrades = 0
        self.upgrades = 0
        self.urgent_downgrades = 0
        self.deferred_downgrades = 0
        self.deferrals = 0
        self.cancelled = 0
        self.priced_bytes = 0  # memory priced upgrades were allowed at the latest plan
        self.priced_bytes_max = 0  # ... and the most at any plan

    def stats(self) -> dict[str, float]:
        w = self._experts.wins
        return {"replans": self.replans, "downgrades": self.downgrades,
                "upgrades": self.upgrades, "urgent_downgrades": self.urgent_downgrades,
                "deferred_downgrades": self.deferred_downgrades, "deferrals": self.deferrals,
                "cancelled_loads": self.cancelled, "priced_bytes": self.priced_bytes,
                "priced_bytes_max": self.priced_bytes_max,
                **{f"evictions_by_{o}": w[k] for k, o in enumerate(ORDERS)}}

    # -- protocol ------------------------------------------------------------------------------

    def _seen(self, m: int, t: float) -> None:
        self._rates.seen(m, t)
        if not self._ever[m]:
            self._ever[m] = True
            self._first[m] = t
        self._count[m] += 1
        self._experts.request(m, t, self.cache.budget)
        if self._probe is not None:
            self._probe.request(m, t, self.cache.budget * (1.0 - self.config.probe))

    def on_hit(self, i: int, t: float, m: int) -> None:
        self._seen(m, t)
        if t >= self._next_plan:
            self._plan(t)

    def on_miss(self, i: int, t: float, m: int) -> int:
        self._seen(m, t)
        c = self.cache
        v = fastest_eligible(c, m, c.budget)
        after = self._make_room(c.mem[m][v], t, exclude=m, loading=v)
        c.load(m, v, t, after=after)
        if after < 0:
            self._upgrade_now(m, v, t)
        if t >= self._next_plan:
            self._plan(t)
        return v

    def on_budget(self, t: float, budget: int) -> None:
        self._experts.shrink(budget)
        if self._probe is not None:
            self._probe.shrink(budget * (1.0 - self.config.probe))
        self._make_room(0, t, exclude=-1)
        self._plan(t)

    # -- room ----------------------------------------------------------------------------------

    def _make_room(self, need: int, t: float, exclude: int, loading: int = -1) -> int:
        """Free memory until ``need`` bytes fit, cheapest first (see the module docstring).

        For a miss (``exclude`` is the model asking), before anyone stalls, an upgraded
        resident hotter than the one asking may step down make-before-break and the miss's
        load wait for it: that model is returned, for ``load(after=)``; -1 when the room is
        there now."""
        c = self.cache
        if c.free >= need:
            return -1
        rates, succ, queued = self._rates, c.succ, c.queued
        lad = self._lad
        # 1. side loads of upgrades cost nothing to abandon
        pending = sorted((r for r in c.resident if c.pend[r] >= 0 and r != exclude
                          and r not in succ and c.mem[r][c.pend[r]] > c.mem[r][c.res[r]]),
                         key=rates.key.__getitem__)
        for r in pending:
            c.cancel(r)
            self.cancelled += 1
            if c.free >= need:
                return -1
        # 2. a miss may wait for a make-before-break downgrade of a hotter model: nobody stalls
        if exclude >= 0 and self.config.defer:
            a = self._deferral(need, t, exclude, loading)
            if a >= 0:
                return a
        # 3. break-before-make downgrades or evictions, whichever is expected to cost less per
        #    byte of the room still wanted (bytes freed beyond it buy nothing): a downgrade's
        #    requests that arrive during the smaller variant's load stall (rate x load_s) and,
        #    until the next plan may step it back up, lose the accuracy it gave up (rate x
        #    tick_s x accuracy lost); an evicted model misses if it comes back within the
        #    window, and then also pays what a step down to its fastest variant costs
        #    (evictions in the order that has missed least lately)
        experts, window, hold = self._experts, self.config.window_s, self.config.tick_s
        while c.free < need:
            best, best_cost, best_v = -1, math.inf, -1
            short = need - c.free
            for r in c.resident:
                if r == exclude or r in succ or r in queued:
                    continue
                cur = c.res[r]
                pos = lad.pos_of[r][cur]
                if pos <= 0:
                    continue
                rungs = lad.ladder[r]
                v = rungs[0]
                for k in range(pos - 1, -1, -1):  # the highest rung that frees enough
                    if c.mem[r][cur] - c.mem[r][rungs[k]] >= short:
                        v = rungs[k]
                        break
                freed = c.mem[r][cur] - c.mem[r][v]
                lost = c.acc[r][cur] - c.acc[r][v]
                cost = rates.rate(r, t) * (c.load_s[r][v] + hold * lost) / max(min(freed, short), 1)
                if cost < best_cost:
                    best, best_cost, best_v = r, cost, v
            victims = [r for r in c.resident if r != exclude and r not in queued]
            if victims:
                e = experts.peek(victims)
                back = 1.0 - math.exp(-self._long_rate(e, t) * window)
                # if it comes back its first request misses, so does every one that arrives
                # while its fastest variant loads, and until the next plan it serves that one
                f = fastest_eligible(c, e, c.budget)
                again = 1.0
                if f >= 0 and c.res[e] >= 0:
                    lost = max(c.acc[e][c.res[e]] - c.acc[e][f], 0.0)
                    again += rates.rate(e, t) * (c.load_s[e][f] + hold * lost)
                if back * again / max(min(c.charged(e), short), 1) < best_cost:
                    experts.victim(victims)  # counts the win
                    c.evict(e, t)
                    continue
            if best < 0:
                break
            c.swap(best, best_v, t, "bbm")
            self.urgent_downgrades += 1
        return -1

    def _long_rate(self, m: int, t: float) -> float:
        """Requests per second of ``m`` since it was first asked for (a periodic model's
        rate, which a decayed count forgets between its requests)."""
        return self._count[m] / max(t - self._first[m], self.config.tau_s)

    def _deferral(self, need: int, t: float, m: int, v: int) -> int:
        """A resident ``a`` hotter than ``m`` whose make-before-break downgrade frees enough
        for ``m`` (started here if not already under way), the one done soonest; -1: none.
        A model with an SLO waits only if its request still finishes within it."""
        c, lad = self.cache, self._lad
        rate_m = self._rates.rate(m, t)
        slo = self._slo[m]
        if slo is not None:
            # the latest a downgrade may finish for m's load and run to meet the SLO
            latest = t + slo - c.load_s[m][v] - c.lat[m][v]
            if latest <= t:
                return -1
        else:
            latest = math.inf
        free = c.free
        best, best_at, best_v = -1, math.inf, -1
        for a in c.resident:
            if a == m or a in c.succ or a in c.queued:
                continue
            if self._rates.rate(a, t) < rate_m:
                continue  # m is hotter: making it wait costs more than a's stalls would
            cur, p = c.res[a], c.pend[a]
            if p >= 0:  # already stepping down: wait for it
                if c.mem[a][p] < c.mem[a][cur] and free + c.mem[a][cur] >= need \
                        and free >= max(0, need - c.mem[a][cur]) and c.pend_at[a] < best_at:
                    best, best_at, best_v = a, c.pend_at[a], -1
                continue
            pos = lad.pos_of[a][cur]
            if pos <= 0 or c.ready_at[a] > t:
                continue
            for k in range(pos - 1, -1, -1):
                v = lad.ladder[a][k]
                mk = c.mem[a][v]
                if free - mk + c.mem[a][cur] >= need and free >= mk + max(0, need - c.mem[a][cur]):
                    at = t + c.load_s[a][v]
                    if at < best_at:
                        best, best_at, best_v = a, at, v
                    break
        if best_at > latest:
            return -1
        if best >= 0 and best_v >= 0:
            c.swap(best, best_v, t, "mbb")
            self.deferred_downgrades += 1
        if best >= 0:
            self.deferrals += 1
        return best

    def _reserve(self, t: float) -> int:
        """Bytes kept for models that are not resident but will come (see the docstring)."""
        c, lad = self.cache, self._lad
        last, ever, horizon = self._rates.last, self._ever, t - self.config.window_s
        # a model not asked for yet is expected while the run is young (a population's
        # models show up in its first window); after that only recent ones are
        unseen = self.config.reserve_unseen and t < self.config.window_s
        coming = sum(lad.min_mem[m] for m in range(c.n)
                     if m not in c.resident and lad.min_mem[m] <= c.budget
                     and ((ever[m] and last[m] >= horizon) or (unseen and not ever[m])))
        return coming

    def _upgrade_now(self, m: int, v: int, t: float) -> None:
        """A model just loaded at its fastest variant starts loading the best one that fits
        in memory nobody is expected to need (make-before-break, beside the first)."""
        c = self.cache
        spare = c.free - self._reserve(t)
        k = c.best_fit(m, spare)
        if k >= 0 and c.acc[m][k] > c.acc[m][v]:
            c.swap(m, k, t, "mbb")
            self.upgrades += 1

    # -- upgrades ------------------------------------------------------------------------------

    def _plan(self, t: float) -> None:
        c, lad = self.cache, self._lad
        self._next_plan = (math.floor(t / self.config.tick_s) + 1) * self.config.tick_s
        self.replans += 1
        resident = list(c.resident)
        if not resident:
            return
        reserve = self._reserve(t)
        floor_bytes = sum(lad.lmem[r][0] for r in resident)
        budget = max(int(c.budget - reserve), floor_bytes)
        if budget < c.budget and self._probe is not None:
            budget = min(c.budget, max(budget, floor_bytes + self._priced(t)))
        now = self._rates.rates(t)
        rates = [0.0] * c.n
        for r in resident:
            rates[r] = max(now[r], 1e-12)
        # plan on what each model will hold once its side load completes
        held = [c.pend[m] if c.pend[m] >= 0 else c.res[m] for m in range(c.n)]
        choice = plan_choice(lad, rates, held, resident, budget, objective="misses",
                             exact=self.config.exact)
        if choice is None:
            return
        downs, ups = [], []
        for r in resident:
            want = choice[r]
            if want < 0 or r in c.succ or r in c.queued:
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

    def _miss_price(self) -> float:
        """Marginal misses per second per byte taken from the working set: what the probe's
        ghosts (at ``1 - probe`` of the budget) miss beyond the full-budget ghosts, in the
        order that ranks evictions now, as a rate, per byte of the difference."""
        e, p = self._experts, self._probe
        k = e.order()
        extra = max(p.score[k] - e.score[k], 0.0)  # decayed counts on the same clock
        cfg = self.config
        return extra * math.log(2) / cfg.half_life_s / max(cfg.probe * self.cache.budget, 1)

    def _priced(self, t: float) -> int:
        """Bytes above the residents' smallest rungs that upgrades worth ``price`` x the
        misses their memory would avoid may take, densest first, at most ``probe x budget``."""
        c, lad, rates = self.cache, self._lad, self._rates
        bar = self.config.price * self._miss_price()
        cap = self.config.probe * c.budget
        offers = []
        for h in c.resident:
            lm, la = lad.lmem[h], lad.lacc[h]
            rate = rates.rate(h, t)
            for j in range(1, len(lm)):
                dm, da = lm[j] - lm[0], la[j] - la[0]
                if dm > 0 and da > 0 and rate * da >= bar * dm:
                    offers.append((rate * da / dm, dm, h))
        offers.sort(key=lambda o: -o[0])
        taken: dict[int, int] = {}
        total = 0
        for _, dm, h in offers:
            more = dm - taken.get(h, 0)
            if more <= 0 or total + more > cap:
                continue
            total += more
            taken[h] = dm
        self.priced_bytes = total
        self.priced_bytes_max = max(self.priced_bytes_max, total)
        return total
