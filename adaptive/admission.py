"""What a variant-aware cache does on a miss, a budget drop and a re-plan: pure decisions.

One mechanism serves both the trace simulator's ``memadapt`` policy
(:mod:`adaptive.policies`) and the real :class:`~adaptive.cache.VariantCache`, so a replay of
a trace through both makes the same decisions. Nothing here loads, locks or sleeps: every
function takes the residency as plain lists and returns :class:`Move` objects, which the
caller carries out (the simulator's ``CacheState`` at once; the cache with its sessions,
make-before-break swaps and ref counts).

Models and candidates are numbered: model ``m`` is ``ladders.demands[m]``, a candidate is an
index into that demand's ``candidates``; ``res[m]`` is the resident candidate (-1: none) and
``resident`` lists the resident models in the order they became resident (ties between equally
cold or equally cheap models go to the first listed, so pass the same order everywhere).

The rules (what the simulator's benchmarks measure):

* **Rates** (:class:`Rates`): an exponentially decayed request count per model (time constant
  ``tau_s``), O(1) per request; ``key[m] = log(count) + t_last / tau`` orders models by current
  rate without decaying the others, so "the coldest resident" is a ``min``.
* **Miss** (:func:`admit`): load the requested model at the best rung that fits in free memory if
  that is at least its plan target (its smallest rung when it has none); otherwise downgrade
  residents one rung at a time, cheapest first (rate x accuracy lost per byte freed), to make
  room for the target or the best rung below it; only when every resident at its smallest rung
  still leaves too little room are the coldest residents evicted. The moves name each model
  once, at its final rung (a two-rung downgrade is one swap).
* **Budget drop** (:func:`shed`): the same, with nothing to load: evict the coldest only as far
  as downgrading everyone could not make the residency fit, then downgrade cheapest first.
* **Re-plan** (:func:`plan_targets`, :func:`apply_targets`): :func:`adaptive.select` gives every
  model with a positive rate a target rung; applying it downgrades residents above their
  target, then upgrades residents below it (hottest first) into free memory, shrinking residents
  the plan left out to their smallest rung to make room. It never evicts; it loads models that
  are not resident only with ``prefetch`` (a server may; the simulator's policy does not, so its
  misses stay comparable with demand-loading baselines). :func:`worth_applying` is the
  hysteresis on the gain; :class:`ReplanSchedule` says *when* to re-plan (every ``tick_s`` of
  clock time at most, when rates drifted, at least every ``max_interval_s``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from adaptive.errors import AdaptiveError
from adaptive.select import OBJECTIVES, ModelDemand, select

__all__ = [
    "Ladders", "Move", "Rates", "ReplanSchedule", "ReplanTimer", "admit", "apply_targets",
    "plan_choice", "plan_targets", "shed", "worth_applying",
]

log = logging.getLogger(__name__)

_EPS = 1e-12


@dataclass(frozen=True, slots=True)
class Move:
    """Make candidate ``variant`` of model ``model`` resident (-1: evict the model)."""

    model: int
    variant: int


class Ladders:
    """Static per-model facts the decisions need, derived once from the demands.

    ``ladder[m]`` lists the candidate indices of model ``m`` that are eligible
    (:meth:`~adaptive.select.ModelDemand.eligible`: the floor, and the SLO) and are not
    dominated (no other eligible candidate is as small and as accurate), by increasing memory:
    walking it down is a sequence of downgrades that each free memory and cost accuracy.
    ``lmem``/``lacc`` are memory and accuracy along the ladder, ``pos_of[m][k]`` the rung of
    candidate ``k`` (-1 when off the ladder), ``step[m][k]`` the log of accuracy lost per byte
    freed stepping down from rung ``k``, ``min_mem[m]`` the smallest rung's memory (inf when no
    candidate meets the floor).
    """

    def __init__(self, demands: Sequence[ModelDemand]):
        self.demands = tuple(demands)
        self.n = len(self.demands)
        self.names = [d.model for d in self.demands]
        self.mem = [[int(c.memory_bytes) for c in d.candidates] for d in self.demands]
        self.acc = [[float(c.accuracy) for c in d.candidates] for d in self.demands]
        self.eligible: list[list[int]] = []
        self.ladder: list[list[int]] = []
        for d in self.demands:
            ok = {id(c) for c in d.eligible()}
            elig = [k for k, c in enumerate(d.candidates) if id(c) in ok]
            self.eligible.append(elig)
            rungs: list[int] = []
            for k in sorted(elig, key=lambda k, d=d: (d.candidates[k].memory_bytes,
                                                      -d.candidates[k].accuracy,
                                                      d.candidates[k].variant)):
                if not rungs or d.candidates[k].accuracy > d.candidates[rungs[-1]].accuracy:
                    rungs.append(k)
            self.ladder.append(rungs)
        self.pos_of: list[list[int]] = []
        self.lmem: list[list[int]] = []
        self.lacc: list[list[float]] = []
        self.step: list[list[float]] = []
        for m, rungs in enumerate(self.ladder):
            pos = [-1] * len(self.mem[m])
            for k, cand in enumerate(rungs):
                pos[cand] = k
            lm = [self.mem[m][k] for k in rungs]
            la = [self.acc[m][k] for k in rungs]
            self.pos_of.append(pos)
            self.lmem.append(lm)
            self.lacc.append(la)
            self.step.append([math.inf] + [
                math.log(max(la[k] - la[k - 1], 1e-12) / max(lm[k] - lm[k - 1], 1))
                for k in range(1, len(rungs))])
        self.min_mem = [lm[0] if lm else math.inf for lm in self.lmem]

    def rung_of(self, m: int, k: int) -> int:
        """The rung of candidate ``k`` of model ``m`` (-1 for -1); a candidate off the
        ladder maps to the best rung no larger (-1 when there is none)."""
        if k < 0:
            return -1
        r = self.pos_of[m][k]
        if r >= 0:
            return r
        lm = self.lmem[m]
        return max((j for j in range(len(lm)) if lm[j] <= self.mem[m][k]), default=-1)

    def best_fit(self, m: int, limit: float) -> int:
        """The most accurate eligible candidate of ``m`` taking at most ``limit`` bytes, or -1."""
        mem = self.mem[m]
        for k in reversed(self.ladder[m]):
            if mem[k] <= limit:
                return k
        return -1


class Rates:
    """Exponentially decayed request counts (time constant ``tau_s``), one per model.

    ``rate(m, t)`` is requests per second; ``key[m]`` (``log(count) + t_last / tau``) orders
    models by current rate without touching the others. A half-life ``h`` is ``tau = h / ln 2``.
    """

    __slots__ = ("tau_s", "count", "last", "key")

    def __init__(self, n: int, tau_s: float):
        if not (isinstance(tau_s, (int, float)) and tau_s > 0):
            raise AdaptiveError(f"the rate time constant must be > 0 seconds, got {tau_s!r}")
        self.tau_s = float(tau_s)
        self.count = [0.0] * n
        self.last = [0.0] * n
        self.key = [-math.inf] * n

    def seen(self, m: int, t: float) -> None:
        """One request for model ``m`` at time ``t``."""
        d = self.last[m] - t
        if d > 0:  # a clock read out of order: count it now, never in the future
            d = 0.0
            t = self.last[m]
        c = self.count[m] * math.exp(d / self.tau_s) + 1.0
        self.count[m] = c
        self.last[m] = t
        self.key[m] = math.log(c) + t / self.tau_s

    def rate(self, m: int, t: float) -> float:
        return self.count[m] * math.exp(min(0.0, self.last[m] - t) / self.tau_s) / self.tau_s

    def rates(self, t: float) -> list[float]:
        """Every model's current rate (requests per second)."""
        tau = self.tau_s
        return [c * math.exp(min(0.0, last - t) / tau) / tau
                for c, last in zip(self.count, self.last)]


# --- misses and budget drops ----------------------------------------------------------------


def _reclaimable(lad: Ladders, res: Sequence[int], resident: Iterable[int], exclude: int) -> int:
    lmem, mem = lad.lmem, lad.mem
    total = 0
    for r in resident:
        if r != exclude:
            total += mem[r][res[r]] - lmem[r][0]
    return total


def _make_room(lad: Ladders, res: Sequence[int], resident: Iterable[int], free: int,
               key: Sequence[float], need: int, exclude: int, evict: bool) -> list[Move]:
    """Moves that leave ``need`` bytes free: (with ``evict``) the coldest residents go only as
    far as downgrading every other resident could not free enough, then residents step down
    one rung at a time, cheapest first. Stops early when nothing more can be freed. Returns
    the evictions, then one downgrade per model to its final rung."""
    mem, lmem, step, ladder, pos_of = lad.mem, lad.lmem, lad.step, lad.ladder, lad.pos_of
    pos = {r: pos_of[r][res[r]] for r in resident if r != exclude}
    moves: list[Move] = []
    if evict:
        reclaim = sum(mem[r][res[r]] - lmem[r][0] for r in pos)
        while free + reclaim < need and pos:
            victim = min(pos, key=key.__getitem__)
            del pos[victim]
            reclaim -= mem[victim][res[victim]] - lmem[victim][0]
            free += mem[victim][res[victim]]
            moves.append(Move(victim, -1))
    stepped: dict[int, None] = {}  # models stepped down, in order of their first step
    while free < need:
        best, best_cost = -1, math.inf
        for r, k in pos.items():
            if k > 0:
                cost = key[r] + step[r][k]
                if cost < best_cost:
                    best, best_cost = r, cost
        if best < 0:
            break
        k = pos[best]
        free += lmem[best][k] - lmem[best][k - 1]
        pos[best] = k - 1
        stepped[best] = None
    moves += [Move(r, ladder[r][pos[r]]) for r in stepped]
    return moves


def admit(lad: Ladders, m: int, res: Sequence[int], resident: Iterable[int], free: int,
          key: Sequence[float], target: int = -1) -> tuple[list[Move], int]:
    """Make room for non-resident model ``m`` and choose the candidate to load.

    ``free`` is budget minus resident bytes, ``key`` the :class:`Rates` keys, ``target`` the
    rung the last plan gave ``m`` (-1: none). Returns the moves to make first (evictions and
    downgrades of other models) and the candidate index of ``m`` to load; its memory fits once
    the moves are made. ``m`` must have an eligible candidate that fits an empty cache.
    """
    lm = lad.lmem[m]
    if not lm:
        raise AdaptiveError(f"model {lad.names[m]!r} has no candidate meeting its floor")
    want = max(target, 0)
    kfree = -1
    for k in range(len(lm) - 1, -1, -1):
        if lm[k] <= free:
            kfree = k
            break
    moves: list[Move] = []
    if kfree < want:
        room = free + _reclaimable(lad, res, resident, m)
        k = want
        while k > kfree and lm[k] > room:
            k -= 1
        if k < 0:  # even all others at their smallest leave too little: evict
            k = 0
            moves = _make_room(lad, res, resident, free, key, lm[0], m, evict=True)
        elif k > kfree:
            moves = _make_room(lad, res, resident, free, key, lm[k], m, evict=False)
        kfree = k
    return moves, lad.ladder[m][kfree]


def shed(lad: Ladders, res: Sequence[int], resident: Iterable[int], free: int,
         key: Sequence[float]) -> list[Move]:
    """Moves that bring an over-budget residency (``free < 0``) back under the budget."""
    if free >= 0:
        return []
    return _make_room(lad, res, resident, free, key, 0, -1, evict=True)


# --- re-plans ---------------------------------------------------------------------------------


def plan_choice(lad: Ladders, rates: Sequence[float], res: Sequence[int],
                resident: Iterable[int], budget: int, *, objective: str = "misses",
                exact: bool | None = None,
                shared: tuple[Sequence[ModelDemand], Mapping[str, int]] | None = None
                ) -> list[int] | None:
    """The candidate :func:`adaptive.select` wants for every model (-1: not in the plan).

    Only models with a positive rate and an eligible candidate within ``budget`` are planned;
    the current residency breaks ties (fewest swaps). With ``shared`` (the demands with
    :class:`~adaptive.sharing.SharedCandidate` candidates, in ``lad``'s model and candidate
    order, and the groups' bytes) :func:`adaptive.sharing.select_shared` plans instead,
    charging each group once. None (and a warning) when the selector fails, so the caller
    keeps serving on its old targets.
    """
    source = lad.demands if shared is None else shared[0]
    demands = []
    for m, d in enumerate(source):
        if lad.min_mem[m] <= budget and rates[m] > 0:
            demands.append(replace(d, rate=rates[m]))
    choice = [-1] * lad.n
    if not demands:
        return choice
    planned = {d.model for d in demands}
    current = {lad.names[r]: lad.demands[r].candidates[res[r]].variant for r in resident
               if lad.names[r] in planned}
    try:
        if shared is None:
            plan = select(demands, budget, objective=objective, exact=exact, resident=current)
        else:
            from adaptive.sharing import select_shared

            plan = select_shared(demands, shared[1], budget, objective=objective,
                                 resident=current)
    except (AdaptiveError, ValueError) as e:
        log.warning("re-plan at a budget of %d bytes failed: %s; keeping the old targets",
                    budget, e)
        return None
    index = {name: m for m, name in enumerate(lad.names)}
    for name, variant in plan.choice.items():
        if variant is not None:
            m = index[name]
            choice[m] = next(k for k, x in enumerate(lad.demands[m].candidates)
                             if x.variant == variant)
    return choice


def plan_targets(lad: Ladders, rates: Sequence[float], res: Sequence[int],
                 resident: Iterable[int], budget: int, *, objective: str = "misses",
                 exact: bool | None = None) -> list[int] | None:
    """:func:`plan_choice` as rungs of ``lad`` (a dominated choice maps to the rung that is
    as small and as accurate)."""
    choice = plan_choice(lad, rates, res, resident, budget, objective=objective, exact=exact)
    if choice is None:
        return None
    return [lad.rung_of(m, k) for m, k in enumerate(choice)]


def apply_targets(lad: Ladders, targets: Sequence[int], res: Sequence[int],
                  resident: Iterable[int], free: int, rates: Sequence[float],
                  key: Sequence[float], *, prefetch: bool = False) -> list[Move]:
    """The moves that bring the residency towards ``targets`` (rungs, -1: none).

    Residents above their target step down to it at once; residents below it step up to it,
    hottest first, into free memory, shrinking residents without a target (coldest first) to
    their smallest rung to make room; an upgrade that still does not fit is left out. With
    ``prefetch``, models not resident but targeted are then loaded the same way, hottest
    first. Nothing is evicted.
    """
    ladder, lmem, pos_of = lad.ladder, lad.lmem, lad.pos_of
    pos = {r: pos_of[r][res[r]] for r in resident}
    moves: list[Move] = []
    ups = []
    for r, k in pos.items():
        want = targets[r]
        if want < 0:
            continue
        if want < k:
            moves.append(Move(r, ladder[r][want]))
            free += lmem[r][k] - lmem[r][want]
            pos[r] = want
        elif want > k:
            ups.append(r)
    ups.sort(key=rates.__getitem__, reverse=True)
    if prefetch:
        ups += sorted((m for m in range(lad.n) if m not in pos and targets[m] >= 0),
                      key=rates.__getitem__, reverse=True)
    if not ups:
        return moves
    spare = sorted((r for r, k in pos.items() if targets[r] < 0 and k > 0), key=key.__getitem__)
    for r in ups:
        k = pos.get(r)
        new = targets[r]
        need = lmem[r][new] - (lmem[r][k] if k is not None else 0)
        while free < need and spare:
            s = spare.pop(0)
            free += lmem[s][pos[s]] - lmem[s][0]
            pos[s] = 0
            moves.append(Move(s, ladder[s][0]))
        if free >= need:
            free -= need
            pos[r] = new
            moves.append(Move(r, ladder[r][new]))
    return moves


def worth_applying(lad: Ladders, res: Sequence[int], resident: Iterable[int],
                   moves: Sequence[Move], rates: Sequence[float], *, hysteresis: float,
                   objective: str = "misses") -> bool:
    """Whether the residency after ``moves`` beats the current one by more than ``hysteresis``.

    Values are ``served = sum(rate)`` and ``utility = sum(rate * accuracy)`` over resident
    models. ``"misses"``: served must grow by more than the fraction ``hysteresis``, or stay
    and utility grow by more than it; ``"accuracy"``: utility alone. With 0 any strict gain
    counts.
    """
    if objective not in OBJECTIVES:
        raise AdaptiveError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    before = {r: res[r] for r in resident}
    after = dict(before)
    for mv in moves:
        if mv.variant < 0:
            after.pop(mv.model, None)
        else:
            after[mv.model] = mv.variant
    acc = lad.acc

    def value(state: dict[int, int]) -> tuple[float, float]:
        served = math.fsum(rates[r] for r in state)
        util = math.fsum(rates[r] * acc[r][k] for r, k in state.items())
        return served, util

    s0, u0 = value(before)
    s1, u1 = value(after)
    gain = u1 > u0 * (1 + hysteresis) + _EPS
    if objective == "misses":
        return s1 > s0 * (1 + hysteresis) + _EPS or (s1 >= s0 - _EPS and gain)
    return gain


@dataclass(frozen=True)
class ReplanSchedule:
    """When request arrivals trigger a re-plan, in clock time.

    At most every ``tick_s`` the rates are compared with those of the last plan: a re-plan is
    due when they drifted by more than ``drift`` (L1, relative to their total), or
    ``max_interval_s`` passed since the last plan (or there was none); never sooner than
    ``min_interval_s`` after the last plan. Budget changes re-plan regardless.
    """

    tick_s: float = 10.0
    min_interval_s: float = 30.0
    max_interval_s: float = 300.0
    drift: float = 0.25

    def __post_init__(self) -> None:
        if not (isinstance(self.tick_s, (int, float)) and self.tick_s > 0):
            raise AdaptiveError(f"ReplanSchedule.tick_s must be > 0 seconds, got {self.tick_s!r}")
        for name in ("min_interval_s", "max_interval_s", "drift"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise AdaptiveError(f"ReplanSchedule.{name} must be >= 0, got {v!r}")

    def timer(self) -> ReplanTimer:
        """A fresh timer following this schedule (one per cache or simulation run)."""
        return ReplanTimer(self)


class ReplanTimer:
    """The state of a :class:`ReplanSchedule`: next tick, last plan and its rates."""

    __slots__ = ("schedule", "next_tick", "last_plan", "plan_rates")

    def __init__(self, schedule: ReplanSchedule):
        self.schedule = schedule
        self.next_tick = schedule.tick_s
        self.last_plan = -math.inf
        self.plan_rates: list[float] | None = None

    def due(self, t: float) -> bool:
        """Whether a request at ``t`` should :meth:`check` (cheap: one comparison)."""
        return t >= self.next_tick

    def check(self, t: float, rates: Callable[[], list[float]]) -> list[float] | None:
        """A tick at ``t``: the current rates when a re-plan is due now, else None."""
        s = self.schedule
        self.next_tick = (math.floor(t / s.tick_s) + 1) * s.tick_s
        if t - self.last_plan < s.min_interval_s:
            return None
        now = rates()
        old = self.plan_rates
        if old is None or t - self.last_plan >= s.max_interval_s:
            return now
        drift = math.fsum(abs(a - b) for a, b in zip(now, old))
        if drift > s.drift * max(math.fsum(old), _EPS):
            return now
        return None

    def planned(self, t: float, rates: list[float]) -> None:
        """Record a re-plan at ``t`` with ``rates`` (whatever triggered it)."""
        self.last_plan = t
        self.plan_rates = rates
