"""A lower bound on the miss rate of *any* caching policy for a trace and a budget.

PFOO-L (Berger, Beckmann and Harchol-Balter, "Practical bounds on optimal caching with
variable object sizes", SIGMETRICS 2018), over each model's smallest eligible variant: a
request is a hit only if its model stayed resident since the model's previous request (no
policy here loads a model nobody asked for), and any resident variant avoids a miss, so a hit
costs at least ``smallest bytes x interval length`` of the cache's space-time. Taking the
cheapest intervals first until the budget's space-time is spent gives the most hits any
policy -- variant-aware or not, online or offline -- can have. Both clocks give a valid bound
(space-time in seconds, and in requests: the residency after each request fits the budget at
that time); the larger bound is reported. On the request clock the bound also uses what sets
an execution cache apart from a CDN: a request cannot bypass the cache, its model is in
memory while it is served, so each request costs its model's bytes at its own instant and a
hit's interval only the instants strictly between (PFOO-L itself allows bypassing, which
makes it looser here).

Where that bound is above the compulsory misses, it is tightened further with the LP
relaxation FOO-L of the same paper on the request clock -- the residency at *each* instant fits
that instant's budget, not only their sum -- with its instants pooled into at most ``segments``
consecutive groups (one capacity constraint per group: a relaxation of FOO-L, so still a
lower bound, and exactly FOO-L when every instant is its own group). Pooling keeps the LP at a
few seconds for 100,000 requests (scipy's HiGHS); without scipy the PFOO-L bound stands alone.

Requests the simulator rejects (no eligible variant fits the budget at that time) are not
served by anyone and are left out, as the simulator's ``miss_rate`` leaves them out.

Compulsory misses are the first served request of each model *and every request for it that
arrives before that first load can have finished*: nothing is resident before a model's first
request, so its load starts then (or later) and takes at least the shortest ``load_s`` of its
eligible variants, and a request that waits for a load is a miss (:mod:`adaptive.simulate`).
Those requests are taken out of the hits any policy could have. (The same holds after every
later miss, but which requests miss depends on the policy, so only the first load is used.)

:func:`best_static_misses` is not a bound: it is what the best *fixed* residency misses when
it is chosen knowing every model's request count. On a trace whose requests are independent
draws from a fixed popularity (the ``zipf`` and ``diurnal`` generators) that is about the best
an online policy can expect, and :func:`irm_online_misses` makes that a bound there: no online
policy's expected misses are below it, so its distance from the bound above is a part of a
policy's ratio to that bound that no online policy can close.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adaptive.admission import Ladders
from adaptive.errors import AdaptiveError
from adaptive.select import ModelDemand
from adaptive.traces import BudgetTrace, RequestTrace

__all__ = ["MissBound", "best_static_misses", "irm_online_misses", "miss_lower_bound"]

log = logging.getLogger(__name__)

#: instants pooled into at most this many groups in the FOO-L relaxation (see the docstring)
SEGMENTS = 20_000


@dataclass(frozen=True)
class MissBound:
    """``misses`` is at most what any policy misses on the trace; ``compulsory`` counts the
    misses of everyone: each model's first served request and the requests that arrive while
    that first load must still be under way."""

    misses: int
    served: int
    compulsory: int

    @property
    def miss_rate(self) -> float:
        return self.misses / self.served if self.served else 0.0

    @property
    def compulsory_rate(self) -> float:
        return self.compulsory / self.served if self.served else 0.0


def _budget_at(budget: int | BudgetTrace, times: np.ndarray) -> np.ndarray:
    if isinstance(budget, BudgetTrace):
        idx = np.searchsorted(budget.timestamps, times, side="right") - 1
        return budget.budget_bytes[np.maximum(idx, 0)].astype(np.float64)
    return np.full(len(times), float(budget))


def _space_time_s(budget: int | BudgetTrace, t0: float, t1: float) -> float:
    if not isinstance(budget, BudgetTrace):
        return float(budget) * (t1 - t0)
    ts = np.asarray(budget.timestamps, dtype=np.float64)
    bs = np.asarray(budget.budget_bytes, dtype=np.float64)
    edges = np.clip(np.append(ts, np.inf), t0, t1)
    return float((np.diff(edges) * bs).sum() + (bs[0] * max(0.0, min(ts[0], t1) - t0)
                                                 if ts[0] > t0 else 0.0))


def _max_hits(cost: np.ndarray, capacity: float) -> int:
    if not len(cost):
        return 0
    c = np.cumsum(np.sort(cost))
    return int(np.searchsorted(c, capacity * (1 + 1e-12), side="right"))


def _foo_l_hits(lo: np.ndarray, hi: np.ndarray, size: np.ndarray, cap: np.ndarray,
                segments: int) -> int | None:
    """Most hits the pooled FOO-L relaxation allows: interval ``j`` (a hit if its model stays
    resident over the instants ``[lo[j], hi[j])``, at ``size[j]`` bytes) is taken fractionally,
    and over each group of consecutive instants the byte-instants taken stay within the sum of
    ``cap``. None when scipy is missing or the solver fails."""
    try:
        import scipy.sparse as sparse
        from scipy.optimize import linprog
    except ImportError:
        return None
    keep = hi > lo  # an interval over no instant costs nothing: always a hit
    free = int((~keep).sum())
    lo, hi, size = lo[keep], hi[keep], size[keep]
    if not len(size):
        return free
    n = len(cap)
    k = max(1, min(int(segments), n))
    edges = np.linspace(0, n, k + 1).round().astype(np.int64)
    edges = np.unique(edges)
    k = len(edges) - 1
    seg_cap = np.add.reduceat(cap, edges[:-1])
    k0 = np.searchsorted(edges, lo, side="right") - 1
    k1 = np.searchsorted(edges, hi - 1, side="right") - 1
    cnt = k1 - k0 + 1
    col = np.repeat(np.arange(len(size)), cnt)
    row = np.repeat(k0, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    overlap = np.minimum(hi[col], edges[row + 1]) - np.maximum(lo[col], edges[row])
    scale = float(size.mean())
    a = sparse.csr_matrix((size[col] * overlap / scale, (row, col)), shape=(k, len(size)))
    res = linprog(-np.ones(len(size)), A_ub=a, b_ub=seg_cap / scale, bounds=(0, 1),
                  method="highs")
    if res.status != 0:
        log.warning("FOO-L relaxation failed (%s); keeping the PFOO-L bound", res.message)
        return None
    best = -float(res.fun)
    # round in the safe direction: a solver's tolerance may only raise the hits allowed
    return free + int(math.floor(best + 1e-6 * max(1.0, best)))


def _unprofiled(trace: RequestTrace, index: dict[str, int]) -> list[str]:
    """The models ``trace`` asks for that ``index`` (model name -> demand) has no profile of."""
    used = np.unique(trace.model) if len(trace) else np.zeros(0, np.int64)
    return sorted({trace.models[k] for k in used.tolist()} - set(index))


def miss_lower_bound(trace: RequestTrace, demands: Sequence[ModelDemand],
                     budget: int | BudgetTrace, *, segments: int = SEGMENTS) -> MissBound:
    """The PFOO-L lower bound on misses, tightened by pooled FOO-L where it is above the
    compulsory misses (see the module docstring; ``segments=0`` keeps PFOO-L alone)."""
    lad = Ladders(demands)
    index = {d.model: k for k, d in enumerate(lad.demands)}
    missing = _unprofiled(trace, index)
    if missing:
        raise AdaptiveError(f"no profiles for trace models {missing[:5]}: give every model the "
                            f"trace asks for a ModelDemand (a profiles file entry), or drop "
                            f"its requests from the trace")
    n = len(trace)
    if n == 0:
        return MissBound(0, 0, 0)
    remap = np.array([index.get(name, -1) for name in trace.models], dtype=np.int64)
    m = remap[trace.model]
    size = np.array(lad.min_mem, dtype=np.float64)[m]
    ts = np.asarray(trace.timestamps, dtype=np.float64)
    b_at = _budget_at(budget, ts)
    served = size <= b_at
    idx = np.flatnonzero(served)
    ms, tt, sz = m[idx], ts[idx], size[idx]
    order = np.lexsort((idx, ms))  # by model, then time
    same = ms[order][1:] == ms[order][:-1]
    a, b = order[:-1][same], order[1:][same]  # consecutive served requests of one model
    # requests that arrive before the model's first load can be done: misses for everyone
    # (the simulator's ready time is t0 + load_s, in the same float arithmetic)
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = ~same
    first = order[starts]
    t_first = np.full(lad.n, np.inf)
    t_first[ms[first]] = tt[first]
    shortest = np.array([min((float(lad.demands[k].candidates[c].load_s)
                              for c in lad.eligible[k]), default=0.0) for k in range(lad.n)])
    loading = tt[b] < t_first[ms[b]] + shortest[ms[b]]
    a, b = a[~loading], b[~loading]
    compulsory = int(len(idx) - len(b))
    # requests: the residency after each request fits the budget in force then, and holds
    # the model just served (an execution cache has no bypass): every served request costs
    # its model's bytes at its own instant, a hit's interval the instants strictly between
    cap_req = float(b_at.sum()) - float(sz.sum())
    hits_req = _max_hits(sz[a] * (idx[b] - idx[a] - 1).astype(np.float64), cap_req)
    cap_s = _space_time_s(budget, float(ts[0]), float(ts[-1]))
    hits_s = _max_hits(sz[a] * (tt[b] - tt[a]), cap_s)
    hits = min(hits_req, hits_s)
    if segments > 0 and len(idx) - hits > compulsory:
        cap = b_at.copy()
        cap[idx] -= sz
        lp = _foo_l_hits(idx[a] + 1, idx[b], sz[a], cap, segments)
        if lp is not None:
            hits = min(hits, lp)
    return MissBound(misses=int(len(idx) - hits), served=int(len(idx)), compulsory=compulsory)


def _static_knapsack(trace: RequestTrace, demands: Sequence[ModelDemand], budget: int,
                     first_miss: bool) -> int | None:
    """Requests served less the most that one fixed set of models (at their smallest eligible
    variants) keeps from missing: each chosen model's request count, less one for its first
    request when ``first_miss``. A knapsack in units of 1/65536 of the budget, sizes rounded
    down (a relaxation: what it finds is at least as good as the best set that fits, and
    overfills the budget by at most one unit per model); None for a budget that changes or a
    model without profiles."""
    if isinstance(budget, BudgetTrace):
        return None
    lad = Ladders(demands)
    index = {d.model: k for k, d in enumerate(lad.demands)}
    if _unprofiled(trace, index):
        return None
    counts = trace.counts()
    unit = max(1, int(budget) >> 16)
    cap = int(budget) // unit
    best = np.zeros(cap + 1)
    served = 0
    for name, c in zip(trace.models, counts.tolist()):
        size = lad.min_mem[index[name]]
        if c == 0 or size > budget:
            continue  # rejected by everyone (or never asked for)
        served += c
        kept = c - 1 if first_miss else c
        w = int(size) // unit
        if w == 0:
            best += kept
        elif w <= cap:
            best[w:] = np.maximum(best[w:], best[:cap + 1 - w] + kept)
    return int(served - best[cap])


def best_static_misses(trace: RequestTrace, demands: Sequence[ModelDemand],
                       budget: int) -> int | None:
    """Misses of the best fixed set of resident models for ``trace`` under a fixed ``budget``,
    chosen knowing every model's request count: each chosen model (at its smallest eligible
    variant) misses its first request, every other model all of its requests (the relaxed
    knapsack of :func:`_static_knapsack`). Not a bound (a policy that adapts may do better on
    a trace whose popularity moves; see the module docstring); None for a budget that changes
    or a model without profiles."""
    return _static_knapsack(trace, demands, budget, first_miss=True)


def irm_online_misses(trace: RequestTrace, demands: Sequence[ModelDemand],
                      budget: int) -> int | None:
    """A lower bound on the *expected* misses of any online policy, variant-aware or not, when
    the trace's requests are independent draws from a fixed popularity (the independent
    reference model: ``zipf``, and ``diurnal``, whose rate alone moves), taken to be the
    trace's own request frequencies ``p``.

    Whatever an online policy holds when a request arrives is a set ``S`` of models that fits
    the budget (each at least at its smallest eligible variant), chosen without knowing which
    model the request is for, so the request misses with probability ``1 - p(S)``, at least
    ``1 - max p(S)`` over the sets that fit; ``N`` requests miss at least ``N (1 - max p(S))``
    times on average, even for a policy that knows ``p`` and loads ahead of demand. The max is
    the relaxed knapsack of :func:`_static_knapsack` (sizes rounded down, which can only raise
    it and so lower the bound). The frequencies stand in for the popularity the trace was
    drawn from; as the expected max over sets of frequencies is at least the max of their
    expectations, that errs low on average. A bound for such traces only (where popularity
    moves, an online policy can follow it and do better); None for a budget that changes or a
    model without profiles."""
    return _static_knapsack(trace, demands, budget, first_miss=False)
