"""Variant selection: a multiple-choice knapsack over models and their variants.

Pure Python: imports neither torch nor onnxruntime, so it can be tested on made-up
numbers, fuzzed against brute force and embedded in any server.

Every model offers candidate variants (memory, accuracy), has an accuracy floor and a
request rate; :func:`select` keeps at most one variant per model resident so that the
chosen memory fits a budget and a documented utility is maximal. That is the
multiple-choice knapsack problem (MCKP). How it is solved:

* Objectives become exact integer *keys* per candidate (values quantized to a power-of-two
  grid, about 2**-48 of n_models * max(rate)), so ties are real ties and tie-break levels
  (keep the resident variant) can be stacked below the utility without ever changing it.
* Per model, dominated candidates (more memory, no more value) are dropped and the upper
  convex hull of (memory, key) is built; "not resident" is the point (0, 0).
* The fast path is the classic MCKP greedy: start with nothing resident, repeatedly take
  the hull upgrade with the best key per byte that fits. Two repairs follow: the first few
  upgrades that did not fit are each tried anyway, giving back the least efficient
  upgrades taken before them, and every plan spends its leftover bytes on the best single
  fitting upgrade (any undominated candidate) until nothing fits; the best plan wins.
* The exact path takes the greedy plan as incumbent, computes the LP relaxation's
  multiplier (the efficiency of the first upgrade that did not fit), removes every
  candidate whose Lagrangian reduced cost exceeds the LP-incumbent gap (usually almost
  all), and runs a dynamic program over the remaining models whose states are the
  Pareto frontier of (memory, key), each pruned by its key plus the LP relaxation of the
  models still to decide. All of it is integer arithmetic, so it is exact; a work limit
  bounds it, after which it returns the best plan found and says so (``exact=False``).
"""

from __future__ import annotations

import logging
import math
import numbers
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from adaptive.errors import InfeasibleBudget

__all__ = [
    "AUTO_EXACT_MAX_OPTIONS", "DEFAULT_NODE_LIMIT", "OBJECTIVES", "Candidate", "ModelDemand",
    "Plan", "check_feasible", "is_downgrade", "select", "smallest_eligible",
]

logger = logging.getLogger(__name__)

#: Objectives :func:`select` knows; see its docstring for their exact definitions.
OBJECTIVES = ("accuracy", "misses")
#: With ``exact=None`` instances with at most this many eligible candidates (summed over
#: models) are solved exactly; larger ones take the fast greedy path.
AUTO_EXACT_MAX_OPTIONS = 5000
#: Default work limit of the exact path, in dynamic-programming states generated (about
#: 1-2 us each). Realistic 100 x 10 instances need well under 1k; degenerate ones (many
#: identical models whose variants lie on one line) can need millions.
DEFAULT_NODE_LIMIT = 50_000

# Quantization grids: a value becomes round(value * 2**k) with k chosen so that
# n_models * max(rate) < 2**bits / 2**k, which bounds any sum of values. Power-of-two scales
# keep dyadic inputs (integer rates, accuracies like 0.75) exact, so their ties stay ties.
_ACC_BITS = 48
_HIT_BITS = 30
# How many blocked upgrades the heuristic tries to force in (see _greedy).
_EXCHANGES = 3


@dataclass(frozen=True)
class Candidate:
    """One variant a model could keep resident, with its profiled cost and quality."""

    variant: str
    memory_bytes: int
    accuracy: float
    latency_s: float = 0.0
    load_s: float = 0.0
    #: the transient peak while it loads (0: unknown, taken as ``memory_bytes``)
    load_peak_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.variant:
            raise ValueError("Candidate.variant must be a non-empty name")
        if int(self.memory_bytes) != self.memory_bytes or self.memory_bytes < 0:
            raise ValueError(f"Candidate {self.variant!r}: memory_bytes must be a non-negative "
                             f"integer, got {self.memory_bytes!r}")
        if not (math.isfinite(self.accuracy) and 0.0 <= self.accuracy <= 1.0):
            raise ValueError(f"Candidate {self.variant!r}: accuracy must be in [0, 1], "
                             f"got {self.accuracy!r}")
        # Plain Python numbers: numpy scalars would make the solver's exact integer
        # arithmetic overflow silently.
        object.__setattr__(self, "memory_bytes", int(self.memory_bytes))
        object.__setattr__(self, "accuracy", float(self.accuracy))
        if int(self.load_peak_bytes) != self.load_peak_bytes or self.load_peak_bytes < 0:
            raise ValueError(f"Candidate {self.variant!r}: load_peak_bytes must be a non-negative "
                             f"integer, got {self.load_peak_bytes!r}")
        object.__setattr__(self, "load_peak_bytes", int(self.load_peak_bytes))
        for name in ("latency_s", "load_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"Candidate {self.variant!r}: {name} must be >= 0, got {v!r}")


@dataclass(frozen=True)
class ModelDemand:
    """A model, the variants it may run as, its accuracy floor, its request rate and,
    optionally, its latency SLO (seconds per request at the profiled batch)."""

    model: str
    candidates: Sequence[Candidate]
    floor: float = 0.0
    rate: float = 1.0
    slo_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.model:
            raise ValueError("ModelDemand.model must be a non-empty name")
        if not (math.isfinite(self.floor) and 0.0 <= self.floor <= 1.0):
            raise ValueError(f"model {self.model!r}: floor must be in [0, 1], got {self.floor!r}")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"model {self.model!r}: rate must be >= 0, got {self.rate!r}")
        object.__setattr__(self, "floor", float(self.floor))
        object.__setattr__(self, "rate", float(self.rate))
        if self.slo_s is not None:
            if isinstance(self.slo_s, bool) or not (isinstance(self.slo_s, (int, float))
                                                    and math.isfinite(self.slo_s)
                                                    and self.slo_s > 0):
                raise ValueError(f"model {self.model!r}: slo_s must be a number of seconds > 0 "
                                 f"or None, got {self.slo_s!r}")
            object.__setattr__(self, "slo_s", float(self.slo_s))
        names = [c.variant for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.model!r}: duplicate candidate variants in {names}")

    def eligible(self) -> tuple[Candidate, ...]:
        """Candidates whose accuracy meets the floor and, when the model has an SLO that some
        of them meet, whose latency meets it too (as INFaaS does: a variant too slow for its
        deadline is not a choice; when none is fast enough the floor alone decides, so the
        model stays servable)."""
        ok = tuple(c for c in self.candidates if c.accuracy >= self.floor)
        if self.slo_s is not None:
            fast = tuple(c for c in ok if c.latency_s <= self.slo_s)
            if fast:
                return fast
        return ok


@dataclass(frozen=True)
class Plan:
    """The outcome of :func:`select`: at most one resident variant per model.

    ``choice`` maps every model to its chosen variant name (None: not resident) and
    ``details`` to the chosen :class:`Candidate`. ``utility`` is the sum of
    ``rate * accuracy`` over resident models and ``served_rate`` the sum of their rates
    (requests served without a cold load), whatever the objective. ``exact`` is True when
    the plan is proven optimal; False when it came from the fast path (unless everything
    fit at its best) or the exact path hit its work limit.
    """

    choice: dict[str, str | None]
    memory_bytes: int
    utility: float
    budget_bytes: int
    exact: bool = True
    details: dict[str, Candidate | None] = field(default_factory=dict, compare=False)
    objective: str = "accuracy"
    served_rate: float = 0.0

    def resident(self) -> dict[str, str]:
        """Models this plan keeps resident and their variants: the ``resident=`` argument
        for the next :func:`select` call, so a re-plan prefers not to swap."""
        return {m: v for m, v in self.choice.items() if v is not None}


def is_downgrade(new: Candidate, old: Candidate) -> bool:
    """Whether a swap from ``old`` to ``new`` is a downgrade (smaller, or as large and less
    accurate) rather than an upgrade: the one order the simulator and the cache count swaps in."""
    return (new.memory_bytes, new.accuracy) < (old.memory_bytes, old.accuracy)


def smallest_eligible(demand: ModelDemand) -> Candidate | None:
    """The least-memory candidate meeting the model's floor (None if none does).

    Ties go to the more accurate candidate, then to the lower variant name.
    """
    eligible = demand.eligible()
    if not eligible:
        return None
    return min(eligible, key=lambda c: (c.memory_bytes, -c.accuracy, c.variant))


def check_feasible(demands: Sequence[ModelDemand], budget_bytes: int,
                   required: Iterable[str]) -> None:
    """Raise :class:`InfeasibleBudget` if a model that must be resident cannot be.

    A model is required when, say, a request for it is pending. Each required model is
    checked alone: it needs an eligible variant (accuracy >= floor) whose memory fits the
    whole budget. Whether all required models fit *together* is for :func:`select` to
    settle. Unknown names in ``required`` are a ValueError.
    """
    budget = _check_budget(budget_bytes)
    by_name = {d.model: d for d in _check_demands(demands)}
    if isinstance(required, str):  # one name, not its characters
        required = [required]
    for name in required:
        demand = by_name.get(name)
        if demand is None:
            raise ValueError(f"required model {name!r} is not among the demands "
                             f"({_short_list(by_name)}); pass a ModelDemand for it")
        smallest = smallest_eligible(demand)
        if smallest is None:
            raise InfeasibleBudget(name, None, None, budget, demand.floor)
        if smallest.memory_bytes > budget:
            raise InfeasibleBudget(name, smallest.variant, smallest.memory_bytes, budget,
                                   demand.floor)


def select(demands: Sequence[ModelDemand], budget_bytes: int, *, objective: str = "accuracy",
           exact: bool | None = None, resident: Mapping[str, str | None] | None = None,
           node_limit: int = DEFAULT_NODE_LIMIT) -> Plan:
    """Choose at most one resident variant per model within ``budget_bytes``.

    Hard rules: a candidate whose accuracy is below its model's floor is never chosen, the
    chosen memory never exceeds the budget, and ``Plan.choice`` names every model (None
    when it is not resident). Models with rate 0 serve nothing and are never chosen.

    Objectives (``rate`` is requests per unit time, any unit, the same for all models):

    * ``"accuracy"`` (default): maximize ``utility = sum(rate_m * accuracy_m)`` over
      resident models, the expected number of correct answers served from memory.
    * ``"misses"``: lexicographic. First maximize ``served_rate = sum(rate_m)`` over
      resident models (requests served without a cold load); among plans with the
      greatest served rate, maximize ``utility`` as above. Rates are compared on a
      power-of-two grid of about 2**-30 of ``n_models * max(rate)``: smaller differences
      count as ties.

    Ties (equal objective) are broken deterministically and independently of the order of
    ``demands`` or candidates: first, when ``resident`` (model -> variant currently held,
    absent or None meaning not resident) is given, by the fewest models whose residency
    changes; then by the least total memory; then by a fixed order derived from the data
    and the model and variant names. These levels sit strictly below the objective, so
    they never trade utility for fewer swaps.

    ``exact=True`` solves exactly (see the module docstring); ``exact=False`` uses the
    greedy, which is never infeasible and typically within a fraction of a percent;
    ``None`` picks exact up to :data:`AUTO_EXACT_MAX_OPTIONS` eligible candidates.
    ``node_limit`` caps the exact path's work; beyond it the best plan found is returned
    with ``exact=False``. Raises ValueError for a negative budget, duplicate model names,
    an unknown objective or a ``resident`` entry naming an unknown model or variant.
    """
    budget = _check_budget(budget_bytes)
    demands = _check_demands(demands)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if resident is not None:
        _check_resident(demands, resident)
    if isinstance(node_limit, bool) or not isinstance(node_limit, int) or node_limit < 1:
        raise ValueError(f"node_limit must be a positive int, got {node_limit!r}")

    models, steps = _prepare(demands, objective, resident)
    if exact is None:
        exact = sum(len(m.mems) - 1 for m in models) <= AUTO_EXACT_MAX_OPTIONS
    if exact:
        pos, proven = _solve_exact(models, steps, budget, node_limit)
    else:
        pos, _, split = _greedy(models, steps, budget)
        proven = split is None  # every model got its best option: optimal
    return _make_plan(demands, models, pos, budget, objective, proven)


# --- validation -------------------------------------------------------------------------

def _check_budget(budget_bytes: object) -> int:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real):
        raise TypeError(f"budget_bytes must be a number of bytes, got {budget_bytes!r}; "
                        f"convert text such as '8GiB' with adaptive.parse_size")
    if not math.isfinite(budget_bytes) or int(budget_bytes) != budget_bytes:
        raise ValueError(f"budget_bytes must be a whole number of bytes, got {budget_bytes!r}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}; a budget of 0 "
                         f"means nothing may be resident")
    return int(budget_bytes)


def _check_demands(demands: Sequence[ModelDemand]) -> list[ModelDemand]:
    demands = list(demands)
    seen: set[str] = set()
    for d in demands:
        if not isinstance(d, ModelDemand):
            raise TypeError(f"demands must be ModelDemand objects, got {d!r}")
        if d.model in seen:
            raise ValueError(f"duplicate model name {d.model!r} in demands; give each model "
                             f"one ModelDemand listing all of its candidate variants")
        seen.add(d.model)
    return demands


def _check_resident(demands: list[ModelDemand], resident: Mapping[str, str | None]) -> None:
    by_name = {d.model: d for d in demands}
    for model, variant in resident.items():
        demand = by_name.get(model)
        if demand is None:
            raise ValueError(f"resident names model {model!r}, which is not among the demands "
                             f"({_short_list(by_name)}); pass a ModelDemand for every resident "
                             f"model")
        if variant is not None and all(c.variant != variant for c in demand.candidates):
            names = [c.variant for c in demand.candidates]
            raise ValueError(f"resident variant {variant!r} of model {model!r} is not one of "
                             f"its candidates {names}")


def _short_list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


# --- the solver ---------------------------------------------------------------------------

class _Options:
    """One model's undominated options, "not resident" first, by increasing memory.

    Keys strictly increase with memory (anything else is dominated), so the best option
    that fits a given number of bytes is found by bisection.
    """

    __slots__ = ("demand_index", "mems", "keys", "cands")

    def __init__(self, demand_index: int, mems: list[int], keys: list[int],
                 cands: list[Candidate | None]):
        self.demand_index = demand_index
        self.mems = mems
        self.keys = keys
        self.cands = cands


def _pow2_scale(exponent: int, bits: int) -> float:
    """A power of two s with x * s < 2**bits for every x < 2**exponent (clamped so that
    absurd rates such as 1e-320 or 1e300 neither overflow nor underflow)."""
    return math.ldexp(1.0, max(-1000, min(1000, bits - exponent)))


def _prepare(demands: list[ModelDemand], objective: str,
             resident: Mapping[str, str | None] | None,
             ) -> tuple[list[_Options], list[tuple[float, int, int, int, int]]]:
    """Integer keys per eligible candidate, dominance filter and convex hull per model.

    Models are ordered by name so the result does not depend on the order of ``demands``.
    Also returns every model's hull upgrades as (-key per byte, model, from option, to
    option, bytes), sorted: the order in which the greedy considers them. This runs on every call
    of the fast path, hence the hand-inlined loops.
    """
    n = len(demands)
    # Any sum of values is <= n * max(rate) < 2**exponent (accuracy <= 1). The maximum, unlike
    # a float sum, neither overflows nor depends on the order of the demands.
    rate_max = max((d.rate for d in demands), default=0.0)
    exponent = math.frexp(rate_max)[1] + n.bit_length()
    acc_scale = _pow2_scale(exponent, _ACC_BITS)
    if objective == "misses":
        hit_scale = _pow2_scale(exponent, _HIT_BITS)
        hit_weight = 2**_ACC_BITS + n + 1  # > any sum of accuracy keys, rounding included
    else:
        hit_scale = 0.0
        hit_weight = 0
    # With ``resident`` keys are multiplied by n + 1 to make room below them for the count
    # of models whose residency stays as it is.
    tie = n + 1 if resident is not None else 1

    models: list[_Options] = []
    steps: list[tuple[float, int, int, int, int]] = []
    inf = math.inf
    for i in sorted(range(n), key=[d.model for d in demands].__getitem__):
        d = demands[i]
        rate = d.rate
        elig = d.eligible()
        scale = rate * acc_scale
        base = int(rate * hit_scale + 0.5) * hit_weight
        # Points are (memory, -key, variant, candidate); (memory, -key, variant) is unique,
        # so sorting never compares candidates. Quantization rounds half up.
        if rate <= 0:
            points = []
        elif resident is None:
            points = [(c.memory_bytes, -(base + int(scale * c.accuracy + 0.5)), c.variant, c)
                      for c in elig]
        else:
            kept = resident.get(d.model)
            # Keeping a non-resident model out is also "no change": rather than a bonus on
            # the empty option (whose key must stay 0), every candidate pays 1.
            shift = 1 if kept is None else 0
            points = [(c.memory_bytes,
                       -((base + int(scale * c.accuracy + 0.5)) * tie - shift
                         + (c.variant == kept)), c.variant, c)
                      for c in elig]
        mi = len(models)
        if not points:
            models.append(_Options(i, [0], [0], [None]))
            continue
        points.append((0, 0, "", None))
        points.sort()
        # Undominated points: key strictly rising with memory.
        first = points[0]
        best = first[1]
        kept_points = [first]
        for p in points:
            if p[1] < best:
                best = p[1]
                kept_points.append(p)
        # Upper concave hull as a stack of (slope into the point, memory, key, index); a
        # point is dropped while the new point's slope from its predecessor is steeper than
        # the slope into it. Collinear points stay: finer greedy steps.
        top_s, top_m, top_k = inf, first[0], -first[1]
        stack = [(top_s, top_m, top_k, 0)]
        for idx in range(1, len(kept_points)):
            mem, negkey, _, _ = kept_points[idx]
            key = -negkey
            slope = (key - top_k) / (mem - top_m)
            while top_s < slope:
                stack.pop()
                top_s, top_m, top_k, _ = stack[-1]
                slope = (key - top_k) / (mem - top_m)
            top_s, top_m, top_k = slope, mem, key
            stack.append((slope, mem, key, idx))
        prev, prev_mem = 0, first[0]
        for slope, mem, _, idx in stack[1:]:
            steps.append((-slope, mi, prev, idx, mem - prev_mem))
            prev, prev_mem = idx, mem
        models.append(_Options(i, [p[0] for p in kept_points], [-p[1] for p in kept_points],
                               [p[3] for p in kept_points]))
    # Sorting on the float alone hits CPython's fast float comparison; the sort is stable,
    # so ties stay in model (name) order and, within a model, in hull order.
    steps.sort(key=itemgetter(0))
    return models, steps


def _greedy(models: list[_Options], steps: list[tuple[float, int, int, int, int]], budget: int,
            ) -> tuple[list[int], int, tuple[int, int] | None]:
    """The MCKP greedy, then repairs; returns option index per model, free bytes and the LP
    relaxation's split item.

    The greedy takes hull upgrades by decreasing key per byte, each if it fits; one that
    does not fit blocks its model's later upgrades. The first that does not fit is the LP
    split item (its efficiency is the optimal LP multiplier), returned as (delta key,
    delta bytes). The greedy alone can be far off when a valuable large upgrade is blocked
    by many small ones taken before it, so for each of the first :data:`_EXCHANGES`
    blocked upgrades an alternative takes it anyway and gives back the least efficient
    upgrades taken before it until the plan fits. Every candidate plan then spends its
    leftover bytes (:func:`_fixup`); the best one wins (the plain greedy on ties).
    """
    pos = [0] * len(models)
    free = budget
    split = None
    taken = []  # the steps taken, in order
    blocked = []  # (steps taken before, model, to, bytes, positions, free) when blocked
    for step in steps:
        _, mi, a, b, dm = step
        if pos[mi] != a:
            continue  # an earlier upgrade of this model did not fit
        if dm > free:
            if split is None:
                split = (models[mi].keys[b] - models[mi].keys[a], dm)
            if len(blocked) < _EXCHANGES:
                blocked.append((len(taken), mi, b, dm, list(pos), free))
            elif free == 0:
                break  # nothing else can fit
            continue
        free -= dm
        pos[mi] = b
        taken.append(step)
    free = _fixup(models, pos, free)
    best_key = sum(m.keys[p] for m, p in zip(models, pos))
    for count, mi, b, dm, alt, alt_free in blocked:
        alt[mi] = b
        alt_free -= dm
        for t in range(count - 1, -1, -1):
            if alt_free >= 0:
                break
            _, ti, ta, tb, tdm = taken[t]
            if ti != mi and alt[ti] == tb:
                alt[ti] = ta
                alt_free += tdm
        if alt_free < 0:
            continue  # cannot fit even alone
        alt_free = _fixup(models, alt, alt_free)
        key = sum(m.keys[p] for m, p in zip(models, alt))
        if key > best_key or (key == best_key and alt_free > free):
            best_key, pos, free = key, alt, alt_free
    return pos, free, split


def _fixup(models: list[_Options], pos: list[int], free: int) -> int:
    """Spend leftover bytes: repeatedly apply the single upgrade (to any undominated
    option) with the largest key gain that fits. Updates ``pos``; returns free bytes."""
    open_ = [mi for mi, m in enumerate(models) if pos[mi] + 1 < len(m.mems)]
    while open_:
        best_gain = 0
        best = None
        still_open = []
        for mi in open_:
            m = models[mi]
            cur = pos[mi]
            mems = m.mems
            if mems[cur + 1] - mems[cur] > free:
                continue  # free only shrinks: this model cannot be upgraded any more
            still_open.append(mi)
            j = bisect_right(mems, mems[cur] + free) - 1
            gain = m.keys[j] - m.keys[cur]
            if gain > best_gain:
                best_gain = gain
                best = (mi, j)
        if best is None:
            break
        mi, j = best
        m = models[mi]
        free -= m.mems[j] - m.mems[pos[mi]]
        pos[mi] = j
        if j + 1 == len(m.mems):
            still_open.remove(mi)  # at its best option
        open_ = still_open
    return free


def _solve_exact(models: list[_Options], steps: list[tuple[float, int, int, int, int]], budget: int,
                 node_limit: int) -> tuple[list[int], bool]:
    """Exact MCKP: greedy incumbent, Lagrangian reduction, bounded Pareto DP.

    Reduction: for any multiplier lam >= 0 and any feasible plan,
    sum(key) <= lam * budget + sum_m (key_m - lam * mem_m), so an option whose reduced cost
    max_m - (key - lam * mem) exceeds (bound - incumbent) cannot beat the incumbent. lam is
    the LP split item's efficiency, which makes the bound the LP bound; everything is
    scaled by the split's byte count so the arithmetic is exact in integers.

    DP: the surviving models one by one; a state is (memory, key) of the models so far,
    only its Pareto frontier is kept, and a state is dropped when its key plus the LP
    relaxation of the models left (exact integer arithmetic) cannot reach the best plan
    known, which improves as states complete to feasible plans with the LP's whole
    upgrades. Ties in (key, memory) keep the state that spends more memory on the models
    decided first (models are ordered by key range, then name): a fixed order.
    """
    pos, free, split = _greedy(models, steps, budget)
    if split is None:
        return pos, True  # every model got its best option
    inc_key = sum(m.keys[p] for m, p in zip(models, pos))
    inc_mem = budget - free
    lam_key, lam_mem = split

    max_t = []
    survivors = []
    for m in models:
        t = [k * lam_mem - lam_key * mem for mem, k in zip(m.mems, m.keys)]
        mx = max(t)
        max_t.append(mx)
        survivors.append(t)
    gap = lam_key * budget + sum(max_t) - inc_key * lam_mem
    fixed_mem = fixed_key = 0
    choice = list(pos)
    dp = []
    for mi, (m, t, mx) in enumerate(zip(models, survivors, max_t)):
        # An option whose reduced cost exceeds the gap cannot be in a plan at least as
        # good as the incumbent; the incumbent's own options always survive.
        keep = [j for j, tj in enumerate(t) if mx - tj <= gap]
        if len(keep) == 1:
            choice[mi] = keep[0]
            fixed_mem += m.mems[keep[0]]
            fixed_key += m.keys[keep[0]]
        else:
            dp.append((mi, keep))
    # Models with the widest key range first: their choices move the bounds most, so
    # the frontier is pruned early and the many near-tied small models come last.
    dp.sort(key=lambda e: models[e[0]].keys[e[1][0]] - models[e[0]].keys[e[1][-1]])
    cap = budget - fixed_mem
    count = len(dp)
    bounds, upgrades = _suffix_lps(models, dp)
    need = inc_key - fixed_key  # what the DP models must reach to matter
    found = None  # (stage, upgrades taken, path) of the best plan seen beyond the incumbent

    states: list[tuple[int, int, tuple | None]] = [(0, 0, None)]
    nodes = 0
    for s, (mi, keep) in enumerate(dp):
        m = models[mi]
        base_mem, base_key, cum_mem, cum_key, next_key, next_mem = bounds[s + 1]
        room = cap - base_mem
        # Keys below are relative to the fixed models and the suffix's smallest options.
        best_known = need - base_key
        last = len(cum_mem) - 1
        opts = [(m.mems[j], m.keys[j], j) for j in keep]
        grown = []
        # Largest-memory states first: of two tied (memory, key) states the first one
        # generated is kept, so ties favour memory spent on the models decided earlier.
        for smem, skey, path in reversed(states):
            if nodes + len(grown) > node_limit:
                break
            for omem, okey, j in opts:
                mem = smem + omem
                if mem > room:
                    break  # options rise in memory
                key = skey + okey
                # Upper bound: this state plus the LP relaxation of the models left.
                x = room - mem
                t = bisect_right(cum_mem, x) - 1
                bound = key + cum_key[t]
                if bound > best_known:
                    # Taking only the whole upgrades is a feasible plan: a better incumbent.
                    best_known = bound
                    found = (s, t, (j, path))
                if t < last:
                    bound += (x - cum_mem[t]) * next_key[t] // next_mem[t]
                if bound >= best_known:
                    grown.append((mem, -key, (j, path)))
        need = best_known + base_key
        nodes += len(grown)
        if nodes > node_limit:
            if found is not None:
                _complete(choice, dp, upgrades, *found)
            else:
                choice = pos
            logger.warning("exact selection stopped at node_limit=%d on %d models (%d in the "
                           "DP); returning the best plan found", node_limit, len(models), count)
            return choice, False
        grown.sort(key=itemgetter(0, 1))
        states = []
        best = None
        for mem, negkey, path in grown:  # Pareto frontier: key strictly rising with memory
            if best is None or -negkey > best:
                best = -negkey
                states.append((mem, best, path))
    logger.debug("exact selection: %d models, %d in the DP, %d states", len(models), count,
                 nodes)
    if not states:  # pragma: no cover - the incumbent's own path always survives
        return pos, True
    mem, key, path = states[-1]
    if (fixed_key + key, -(fixed_mem + mem)) < (inc_key, -inc_mem):
        return pos, True  # pragma: no cover - likewise
    _complete(choice, dp, [], count - 1, 0, path)
    return choice, True


def _complete(choice: list[int], dp: list[tuple[int, list[int]]],
              upgrades: list[tuple[int, int, int, int, int, int]], stage: int, taken: int,
              path: tuple) -> None:
    """Write into ``choice`` the plan of a DP state after ``stage`` (its ``path`` holds the
    options of dp[0..stage]) completed by the first ``taken`` LP upgrades of the rest."""
    for s in range(stage, -1, -1):
        j, path = path
        choice[dp[s][0]] = j
    for s in range(stage + 1, len(dp)):
        choice[dp[s][0]] = dp[s][1][0]
    for _, s, _, b, _, _ in upgrades:
        if taken == 0:
            break
        if s > stage:
            choice[dp[s][0]] = b
            taken -= 1


def _suffix_lps(models: list[_Options], dp: list[tuple[int, list[int]]],
                ) -> tuple[list[tuple[int, int, list[int], list[int], list[int], list[int]]],
                           list[tuple[int, int, int, int, int, int]]]:
    """LP relaxations of the DP's suffixes: for stage s, the models dp[s:], each limited
    to its surviving options.

    Entry s is (memory and key of every model at its smallest option, then the cumulative
    memory and key after the first t hull upgrades by decreasing key per byte, and the
    key and memory of upgrade t + 1). The LP value at x spare bytes is the key after the
    upgrades that fit plus the fitting fraction of the next one. Also returns the upgrades,
    sorted, as (-scaled key per byte, stage, from option, to option, delta key, delta bytes).
    """
    upgrades = []
    for s, (mi, keep) in enumerate(dp):
        mems = models[mi].mems
        keys = models[mi].keys
        hull = [keep[0]]
        for j in keep[1:]:  # exact integer upper hull of the survivors
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (keys[b] - keys[a]) * (mems[j] - mems[b]) < \
                        (keys[j] - keys[b]) * (mems[b] - mems[a]):
                    hull.pop()
                else:
                    break
            hull.append(j)
        for a, b in zip(hull, hull[1:]):
            upgrades.append((s, a, b, keys[b] - keys[a], mems[b] - mems[a]))
    # Sort by key per byte exactly: two different fractions dk/dm differ by at least
    # 1/(dm1*dm2), so scaled by 2**shift > 2 * max(dm)**2 their floors differ too.
    shift = 2 * max((u[4] for u in upgrades), default=1).bit_length() + 1
    upgrades = sorted((-((dk << shift) // dm), s, a, b, dk, dm) for s, a, b, dk, dm in upgrades)
    out = [(0, 0, [0], [0], [], [])] * (len(dp) + 1)
    base_mem = base_key = 0
    for s in range(len(dp) - 1, -1, -1):
        mi, keep = dp[s]
        base_mem += models[mi].mems[keep[0]]
        base_key += models[mi].keys[keep[0]]
        cum_mem = [0]
        cum_key = [0]
        next_key = []
        next_mem = []
        for _, stage, _, _, dk, dm in upgrades:
            if stage >= s:
                next_key.append(dk)
                next_mem.append(dm)
                cum_mem.append(cum_mem[-1] + dm)
                cum_key.append(cum_key[-1] + dk)
        out[s] = (base_mem, base_key, cum_mem, cum_key, next_key, next_mem)
    return out, upgrades


def _make_plan(demands: list[ModelDemand], models: list[_Options], pos: list[int], budget: int,
               objective: str, exact: bool) -> Plan:
    chosen: list[Candidate | None] = [None] * len(demands)
    for m, p in zip(models, pos):
        chosen[m.demand_index] = m.cands[p]
    details: dict[str, Candidate | None] = {}
    choice: dict[str, str | None] = {}
    memory = 0
    values = []
    rates = []
    for d, c in zip(demands, chosen):
        details[d.model] = c
        if c is None:
            choice[d.model] = None
        else:
            choice[d.model] = c.variant
            memory += c.memory_bytes
            values.append(d.rate * c.accuracy)
            rates.append(d.rate)
    if memory > budget:  # pragma: no cover - guarded by construction
        raise AssertionError(f"selection exceeded the budget: {memory} > {budget}")
    # fsum: the same plan reports the same figures whatever the order of the demands.
    return Plan(choice=choice, memory_bytes=memory, utility=math.fsum(values),
                budget_bytes=budget, exact=exact, details=details, objective=objective,
                served_rate=math.fsum(rates))
