"""Trace-driven simulation of a model execution cache, from profiles alone (no model runs).

Semantics (the choices a reader needs to compare numbers with other papers):

* A request for a model whose variant is resident and loaded is a **hit**, served by it at
  once. One for a model with nothing resident is a **miss**: the policy loads a variant and
  the request waits its ``load_s``; so does every request for the model that arrives while
  that load is still under way (a load a request waits for is a miss). A request that waits
  for a break-before-make swap (the old variant gone, the new one loading) is a **stall**.
  If no eligible variant fits even an empty cache at the current budget, the request is
  **rejected** (counted, not served).
* Swaps are make-before-break (both variants charged until the new one is loaded; the old
  one serves meanwhile) or break-before-make; the policy chooses per move
  (:mod:`adaptive.cachestate`). What is charged never exceeds the budget at any instant;
  loads proceed in parallel.
* Execution takes ``latency_s * batch`` (no batching gain is assumed) on an uncontended device:
  there is no queueing between requests, so latency differences come from loads and variants.
* A model may have a latency SLO (``ModelDemand.slo_s``): a request is **on time** when its
  latency (wait + execution) is within it; without an SLO, when it did not wait at all.
  Rejected requests are never on time.
* Budget changes apply before any request with the same timestamp; the first value of a
  :class:`BudgetTrace` holds from time 0.

Metrics: ``miss_rate``, ``stall_rate`` (over served requests), ``slo_attainment`` (on-time
share of all requests), ``goodput`` (on-time requests per second of trace),
``effective_accuracy`` (mean over all requests of the served variant's accuracy when on time,
else 0), ``normalized_accuracy`` (mean over served requests of accuracy / the model's best
variant's accuracy, so classifier accuracy and encoder fidelity can be averaged),
``mean_accuracy``, ``bytes_loaded`` (every load and swap), ``load_delay_over_exec``
(CremeBrulee's load/exec: waits over execution time). Where effective accuracy goes:
``accuracy_lost_late`` (per request, the best variant's accuracy of each request that was not on
time or was rejected) and ``accuracy_lost_rungs`` (per request, the best variant's accuracy less
the served one's, over on-time requests), so that ``effective_accuracy = best_accuracy -
accuracy_lost_late - accuracy_lost_rungs`` with ``best_accuracy`` the mean over all requests of
the model's best variant's accuracy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from adaptive.bounds import miss_lower_bound
from adaptive.cachestate import CacheInvariantError, CacheState
from adaptive.errors import AdaptiveError
from adaptive.policies import Policy, get_policy
from adaptive.select import Candidate, ModelDemand
from adaptive.traces import BudgetTrace, RequestTrace, validate_models

log = logging.getLogger(__name__)

#: at most this many points in SimResult.memory_series (plus one per budget change)
SERIES_POINTS = 512

HIT, MISS, STALL = 0, 1, 2


@dataclass(frozen=True)
class SimResult:
    """What one policy did on one trace; ``to_dict()`` is JSON-ready (NaN becomes null: the
    ``bound`` row has a miss rate and nothing else)."""

    policy: str
    requests: int
    hits: int
    misses: int
    miss_rate: float
    rejected: int
    mean_latency_s: float
    p99_latency_s: float
    load_delay_over_exec: float
    mean_accuracy: float
    floor_violations: int
    swaps: int
    loads: int
    evictions: int
    peak_bytes: int
    stalls: int = 0
    stall_rate: float = 0.0
    slo_attainment: float = 1.0
    goodput: float = 0.0
    effective_accuracy: float = 0.0
    normalized_accuracy: float = 0.0
    bytes_loaded: int = 0
    #: where effective accuracy goes (see the module docstring): the best accuracy on every
    #: request, and what late (or rejected) requests and smaller variants took of it
    best_accuracy: float = 0.0
    accuracy_lost_late: float = 0.0
    accuracy_lost_rungs: float = 0.0
    #: swaps carried out, by direction (:attr:`adaptive.cachestate.CacheState.downgrades`):
    #: a cancelled make-before-break swap is not one
    downgrades: int = 0
    upgrades: int = 0
    #: (time_s, resident_bytes, budget_bytes), downsampled to about SERIES_POINTS points
    memory_series: tuple[tuple[float, int, int], ...] = field(default=(), repr=False)
    policy_stats: Mapping[str, float] = field(default_factory=dict, compare=False)
    wall_s: float = field(default=0.0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory_series"] = [list(p) for p in self.memory_series]
        d["policy_stats"] = dict(self.policy_stats)
        for k, v in d.items():
            if isinstance(v, float) and math.isnan(v):
                d[k] = None
        return d


def _budget_steps(budget: int | BudgetTrace) -> tuple[list[float], list[int]]:
    if isinstance(budget, BudgetTrace):
        return budget.timestamps.tolist(), [int(b) for b in budget.budget_bytes.tolist()]
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise AdaptiveError(f"budget must be a non-negative int or a BudgetTrace, got {budget!r}")
    return [0.0], [int(budget)]


def simulate(trace: RequestTrace, demands: Sequence[ModelDemand], policy: Policy | str,
             budget: int | BudgetTrace, *, seed: int = 0) -> SimResult:
    """Replay ``trace`` against a cache run by ``policy`` under ``budget`` bytes.

    ``demands`` give each model's candidates (memory, latency, load time, accuracy), floor and
    SLO; their ``rate`` is ignored (policies estimate rates from the trace). Deterministic for
    a given ``seed``. Raises :class:`~adaptive.traces.TraceError` naming the first request for
    a model without a profile.
    """
    demands = tuple(demands)
    names = [d.model for d in demands]
    if len(set(names)) != len(names):
        raise AdaptiveError("duplicate model names in demands")
    validate_models(trace, names)
    pol = get_policy(policy) if isinstance(policy, str) else policy
    b_times, b_vals = _budget_steps(budget)

    index = {n: k for k, n in enumerate(names)}
    remap = np.array([index.get(n, -1) for n in trace.models], dtype=np.int64)
    dm = remap[trace.model] if len(trace) else np.zeros(0, np.int64)
    ts = trace.timestamps.tolist()
    ms = dm.tolist()
    n = len(ts)

    cache = CacheState(demands, b_vals[0])
    pol.reset(cache, seed=seed, future=dm if pol.offline else None)
    gbase = np.concatenate([[0], np.cumsum([len(d.candidates) for d in demands])]).astype(np.int64)
    gb = gbase.tolist()

    res, ready, stalling, min_mem = cache.res, cache.ready_at, cache.stalling, cache.min_mem
    settle, heap = cache.settle, cache._heap
    on_hit, on_miss = pol.on_hit, pol.on_miss
    served = [-1] * n
    kind = [HIT] * n
    wait_i: list[int] = []
    wait_s: list[float] = []
    hits = misses = stalls = rejected = 0
    series: list[tuple[float, int, int]] = [(0.0, 0, cache.budget)]
    bj = 1
    next_bt = b_times[1] if len(b_times) > 1 else math.inf
    chunk = max(1, -(-n // SERIES_POINTS))
    t0 = time.perf_counter()

    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        for i in range(start, stop):
            t = ts[i]
            while t >= next_bt:
                settle(next_bt)
                cache.budget = b_vals[bj]
                pol.on_budget(next_bt, cache.budget)
                if cache.used > cache.budget:
                    raise CacheInvariantError(
                        f"policy {pol.name!r} left {cache.used} bytes charged after the budget "
                        f"dropped to {cache.budget} at t={next_bt}")
                series.append((next_bt, cache.used, cache.budget))
                bj += 1
                next_bt = b_times[bj] if bj < len(b_times) else math.inf
            cache.now = t
            if heap and heap[0][0] <= t:
                settle(t)
            m = ms[i]
            if res[m] >= 0:
                on_hit(i, t, m)
                v = res[m]
                if v < 0:
                    raise CacheInvariantError(f"policy {pol.name!r} evicted the model it was "
                                              f"serving a hit for (request #{i})")
                r = ready[m]
                if r > t:
                    wait_i.append(i)
                    wait_s.append(r - t)
                    if stalling[m]:
                        kind[i] = STALL
                        stalls += 1
                    else:
                        kind[i] = MISS
                        misses += 1
                else:
                    hits += 1
            else:
                if min_mem[m] > cache.budget:
                    rejected += 1
                    continue
                v = on_miss(i, t, m)
                if v < 0 or res[m] != v:
                    raise CacheInvariantError(f"policy {pol.name!r} returned candidate {v} for "
                                              f"request #{i} but holds {res[m]}")
                kind[i] = MISS
                misses += 1
                r = ready[m]
                if r > t:
                    wait_i.append(i)
                    wait_s.append(r - t)
            served[i] = gb[m] + v
        series.append((ts[stop - 1], cache.used, cache.budget))
    wall = time.perf_counter() - t0

    # Per-request metrics, vectorised over the served candidate ids.
    cands = [c for d in demands for c in d.candidates]
    acc_g = np.array([c.accuracy for c in cands])
    lat_g = np.array([c.latency_s for c in cands])
    floor_m = np.array([d.floor for d in demands])
    best_m = np.array([max(c.accuracy for c in d.candidates) for d in demands])
    slo_m = np.array([d.slo_s if d.slo_s is not None else np.nan for d in demands])
    sv = np.array(served, dtype=np.int64)
    ok = sv >= 0
    wait = np.zeros(n)
    if wait_i:
        wait[np.array(wait_i)] = wait_s
    exec_s = lat_g[sv[ok]] * trace.batch[ok]
    latency = exec_s + wait[ok]
    acc = acc_g[sv[ok]]
    mo = dm[ok]
    slo = slo_m[mo]
    on_time = np.where(np.isnan(slo), wait[ok] <= 0.0, latency <= np.nan_to_num(slo) + 1e-12)
    n_served = int(ok.sum())
    duration = trace.duration_s if n else 0.0
    best_all = best_m[dm] if n else np.zeros(0)
    best_ok = best_m[mo]
    lost_rungs = float(((best_ok - acc) * on_time).sum())
    lost_late = float(best_all.sum() - (best_ok * on_time).sum())
    return SimResult(
        policy=pol.name or type(pol).__name__,
        requests=n,
        hits=hits,
        misses=misses,
        miss_rate=misses / n_served if n_served else 0.0,
        rejected=rejected,
        mean_latency_s=float(latency.mean()) if n_served else 0.0,
        p99_latency_s=float(np.percentile(latency, 99)) if n_served else 0.0,
        load_delay_over_exec=(float(wait.sum() / exec_s.sum()) if n_served and exec_s.sum() > 0
                              else 0.0),
        mean_accuracy=float(acc.mean()) if n_served else 0.0,
        floor_violations=int((acc < floor_m[mo] - 1e-12).sum()),
        swaps=cache.swaps,
        loads=cache.loads,
        evictions=cache.evictions,
        peak_bytes=cache.peak,
        stalls=stalls,
        stall_rate=stalls / n_served if n_served else 0.0,
        slo_attainment=float(on_time.sum()) / n if n else 1.0,
        goodput=float(on_time.sum()) / duration if duration > 0 else 0.0,
        effective_accuracy=float((acc * on_time).sum()) / n if n else 0.0,
        normalized_accuracy=(float((acc / np.maximum(best_m[mo], 1e-12)).mean()) if n_served
                             else 0.0),
        bytes_loaded=cache.bytes_loaded,
        best_accuracy=float(best_all.mean()) if n else 0.0,
        accuracy_lost_late=lost_late / n if n else 0.0,
        accuracy_lost_rungs=lost_rungs / n if n else 0.0,
        downgrades=cache.downgrades,
        upgrades=cache.upgrades,
        memory_series=tuple(series),
        policy_stats=pol.stats(),
        wall_s=wall,
    )


def bound_result(trace: RequestTrace, demands: Sequence[ModelDemand],
                 budget: int | BudgetTrace) -> SimResult:
    """The ``bound`` row: :func:`adaptive.bounds.miss_lower_bound` as a :class:`SimResult`
    whose other figures are NaN (no policy stands behind it)."""
    t0 = time.perf_counter()
    b = miss_lower_bound(trace, demands, budget)
    nan = math.nan
    return SimResult(policy="bound", requests=len(trace), hits=b.served - b.misses,
                     misses=b.misses, miss_rate=b.miss_rate, rejected=len(trace) - b.served,
                     mean_latency_s=nan, p99_latency_s=nan, load_delay_over_exec=nan,
                     mean_accuracy=nan, floor_violations=0, swaps=0, loads=b.misses,
                     evictions=0, peak_bytes=0, stalls=0, stall_rate=0.0, slo_attainment=nan,
                     goodput=nan, effective_accuracy=nan, normalized_accuracy=nan,
                     bytes_loaded=0, best_accuracy=nan, accuracy_lost_late=nan,
                     accuracy_lost_rungs=nan,
                     policy_stats={"compulsory_miss_rate": b.compulsory_rate},
                     wall_s=time.perf_counter() - t0)


def compare(trace: RequestTrace, demands: Sequence[ModelDemand],
            policies: Sequence[str | Policy] = ("lru", "memadapt"), budget: int | BudgetTrace = 0,
            *, seed: int = 0, bound: bool = False) -> dict[str, SimResult]:
    """Run :func:`simulate` for each policy on the same trace and budget, keyed by policy name;
    with ``bound``, add the ``bound`` row (:func:`bound_result`)."""
    out: dict[str, SimResult] = {}
    for p in policies:
        r = simulate(trace, demands, p, budget, seed=seed)
        out[r.policy] = r
        log.debug("%s: miss rate %.4f, stall rate %.4f, effective accuracy %.4f, %.2fs",
                 r.policy, r.miss_rate, r.stall_rate, r.effective_accuracy, r.wall_s)
    if bound:
        out["bound"] = bound_result(trace, demands, budget)
    return out


def clone_population(demands: Sequence[ModelDemand], n: int, seed: int = 0, *,
                     jitter: float = 0.1) -> tuple[ModelDemand, ...]:
    """``n`` models cloned round-robin from the given families, named ``family#07``.

    Serving many fine-tuned copies of few architectures is the common case, and profiling each
    copy would measure the same numbers. Each clone's latency and load time are scaled by one
    factor in ``[1 - jitter, 1 + jitter]`` (deterministic for ``seed``), so clones are not
    exactly interchangeable and ties between them do not depend on name order; memory and
    accuracy are kept as profiled.
    """
    demands = tuple(demands)
    if not demands:
        raise AdaptiveError("clone_population needs at least one family")
    if n < 1:
        raise AdaptiveError(f"n must be >= 1, got {n}")
    if not 0 <= jitter < 1:
        raise AdaptiveError(f"jitter must be in [0, 1), got {jitter}")
    rng = np.random.default_rng(seed)
    factors = 1.0 + jitter * (2.0 * rng.random(n) - 1.0)
    per_family = -(-n // len(demands))
    width = max(2, len(str(per_family - 1)))
    out = []
    for k in range(n):
        fam = demands[k % len(demands)]
        f = float(factors[k])
        cands = [Candidate(c.variant, c.memory_bytes, c.accuracy, c.latency_s * f, c.load_s * f)
                 for c in fam.candidates]
        out.append(replace(fam, model=f"{fam.model}#{k // len(demands):0{width}d}",
                           candidates=cands))
    return tuple(out)
