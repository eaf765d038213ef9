"""Replay a request trace for real through a :class:`~adaptive.cache.VariantCache` and set the
result beside the simulator's, to validate the simulator.

Both sides make the same decisions: the cache runs the same registered policy
(:mod:`adaptive.cache_policy` drives it on a mirror of the cache) and its clock is the trace's
timestamps, so decisions follow trace time while requests run back to back without sleeping.
What differs is what the simulator can only assume: how long loads, swaps and runs take.

* Every trace model is its own cache model (its own sessions and memory) backed by a stored
  model's variants: itself when the store has it, else the store's models round-robin
  (:func:`adaptive.catalog.map_population`, as ``memadapt simulate`` does).
* Candidates come from the catalog at ``batch`` (memory at that batch size, per-request latency
  and cold load time as profiled), or from ``candidates=``.
* A request runs on each model's example inputs (the profiler's) with the trace's batch size,
  which must not exceed ``batch``. Its real latency is the wall time of ``cache.infer``,
  waiting for loads and swaps included.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adaptive.errors import AdaptiveError
from adaptive.select import Candidate, ModelDemand
from adaptive.simulate import SimResult, simulate
from adaptive.traces import RequestTrace, read_requests

__all__ = ["ReplayMetric", "ReplayReport", "VariantRuns", "replay"]

log = logging.getLogger(__name__)

#: (description, done, total), the CLI's progress protocol
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ReplayMetric:
    """One figure, simulated and measured."""

    name: str
    simulated: float
    real: float

    @property
    def difference(self) -> float:
        """``(real - simulated) / simulated``: 0 when both are 0, inf when only real is not."""
        if self.simulated == 0:
            return 0.0 if self.real == 0 else math.inf
        return (self.real - self.simulated) / abs(self.simulated)


@dataclass(frozen=True)
class VariantRuns:
    """One variant's runs in the real replay beside its profile: where a latency gap between
    the sides comes from (a profile taken at another moment of a shared machine, or what
    the cache adds to a run). Only hits count: their latency is the run alone."""

    variant: str
    hits: int
    profiled_s: float
    real_mean_s: float

    @property
    def difference(self) -> float:
        """``(real - profiled) / profiled``, as :attr:`ReplayMetric.difference`."""
        return ReplayMetric("run_s", self.profiled_s, self.real_mean_s).difference


@dataclass(frozen=True)
class ReplayReport:
    """A real replay beside its simulation; ``to_dict()`` is JSON-ready.

    ``metrics`` holds miss rate, mean and p99 latency (seconds) and, to show the decisions
    agree, mean served accuracy and the counts of evictions, downgrades and upgrades.
    ``failures`` are requests that raised in the real run (``errors`` has the first few);
    ``rejected`` those the simulator could not serve (no eligible variant fits the budget).
    """

    requests: int
    served: int
    failures: int
    rejected: int
    budget_bytes: int
    batch: int
    device: str
    backend: str
    #: trace model -> the stored model whose variants back it
    models: Mapping[str, str]
    metrics: tuple[ReplayMetric, ...]
    simulated: SimResult = field(repr=False)
    real_counts: Mapping[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    errors: tuple[str, ...] = ()
    policy: str = "memadapt"
    #: what both sides planned with: the budget less the cache's headroom for a load's peak
    plan_budget_bytes: int = 0
    #: per served variant, its hits' real run time beside the profiled one
    runs: tuple[VariantRuns, ...] = ()

    def metric(self, name: str) -> ReplayMetric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"no metric {name!r}; known: {', '.join(m.name for m in self.metrics)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = dict(self.models)
        d["real_counts"] = dict(self.real_counts)
        d["metrics"] = [{"name": m.name, "simulated": m.simulated, "real": m.real,
                         "difference": m.difference if math.isfinite(m.difference) else None}
                        for m in self.metrics]
        d["simulated"] = self.simulated.to_dict() | {"memory_series": None}
        d["runs"] = [asdict(r) | {"difference": r.difference if math.isfinite(r.difference)
                                  else None} for r in self.runs]
        return d


def replay(store: Any, trace: RequestTrace | str | os.PathLike[str], *, budget: int | str,
           floors: Mapping[str, float] | None = None, device: str = "cpu",
           backend: str = "onnxruntime", batch: int = 1, max_requests: int | None = None,
           threads: int | None = 1,
           candidates: Mapping[str, Sequence[Candidate]] | Sequence[ModelDemand] | None = None,
           policy: str = "memadapt", pin_allocator: bool = True,
           progress: Progress | None = None) -> ReplayReport:
    """Run ``trace`` (its first ``max_requests`` requests) through a real VariantCache run by
    ``policy`` and through :func:`adaptive.simulate` with the same policy, on the same
    candidates and ``budget`` (bytes or a size such as ``"64MiB"``); report both side by side.

    The cache's clock is the trace's timestamps and it makes the swaps a request causes on
    the request's thread after its result (``swap_workers=0``), so both sides see the same
    events in the same order; the simulator plans with what the cache plans with (the budget
    less the headroom it keeps for one load's peak). A real request counts as a miss (or a
    stall) when it waited for a load, or when, on the trace's clock, it arrived before the
    load it needed had ended (:attr:`~adaptive.cache.InferResult.queued_s`, added to its
    latency): the wait it would have had in real time.

    ``candidates`` (store model or trace model -> candidates naming stored variants, or
    :class:`ModelDemand` families whose floors and SLOs apply) default to the catalog's at
    ``batch``. ``floors`` (trace model or store model -> accuracy floor) override them; a
    store model's floor applies to every trace model it backs. ``threads`` is each session's
    intra-op threads (profile with the same number for comparable latency).

    ``pin_allocator`` (CPU): the real cache runs as the profiler measured and as ``memadapt
    serve`` runs, with glibc's mmap threshold pinned (:func:`profiler.memory.pin_allocator`,
    a setting of the whole process, kept after the replay). Without it run times are not the
    profile's: pinned, a run's buffers above 128 KiB are fresh mappings, page-faulted in on
    every run (about 4,700 minor faults per int8 ResNet-18 run), where unpinned they come back
    from the heap, and int8 MiniLM and ResNet-18 ran 1.4x and 3.6x faster on the machine of
    ``benchmarks/results/replay.md``: the real side would not be what the simulator models.
    """
    from adaptive.cache import VariantCache
    from adaptive.catalog import map_population
    from adaptive.policies import get_policy, list_policies, policy_class
    from adaptive.units import parse_size
    from variants import Store

    store = store if isinstance(store, Store) else Store(store)
    if policy not in list_policies():
        raise AdaptiveError(f"unknown policy {policy!r}; known: {', '.join(list_policies())}")
    if policy_class(policy).offline:
        raise AdaptiveError(f"policy {policy!r} is offline (it needs the future trace); a real "
                            f"cache can replay only online policies")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise AdaptiveError(f"batch must be an int >= 1, got {batch!r}")
    budget_bytes = int(parse_size(budget)) if isinstance(budget, str) else budget
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise AdaptiveError(f"budget must be a non-negative number of bytes, got {budget!r}")
    if not isinstance(trace, RequestTrace):
        trace = read_requests(trace)
    trace = _head(trace, max_requests)
    if len(trace) == 0:
        raise AdaptiveError("the trace has no requests to replay")
    big = np.flatnonzero(trace.batch > batch)
    if len(big):
        i = int(big[0])
        raise AdaptiveError(f"request #{i} has batch {int(trace.batch[i])}, more than "
                            f"batch={batch}, the size memory is profiled and charged at; "
                            f"replay with a larger batch")

    families = _families(store, candidates, device, backend, batch)
    floors = dict(floors or {})
    fam_names = {d.model for d in families}
    unknown = sorted(set(floors) - fam_names - set(trace.models))
    if unknown:
        raise AdaptiveError(f"floors name models {unknown} that are neither trace models nor "
                            f"profiled store models ({', '.join(sorted(fam_names))})")
    population = map_population(families, list(trace.models))
    family_of = {}
    for d in population:
        family_of[d.model] = next(f.model for f in families if f.candidates is d.candidates)
    used = sorted({trace.models[k] for k in np.unique(trace.model).tolist()})
    demands = []
    by_name = {d.model: d for d in population}
    for name in used:  # sorted: the cache numbers its models in name order too
        d = by_name[name]
        floor = floors.get(name, floors.get(family_of[name], d.floor))
        demands.append(ModelDemand(name, d.candidates, floor=floor, slo_s=d.slo_s))
    # a family is a base model or a group (whose candidates have several bases)
    base_of = {d.model: family_of[d.model] for d in demands}
    acc_of = {(d.model, c.variant): c.accuracy for d in demands for c in d.candidates}
    lat_of = {c.variant: c.latency_s for d in demands for c in d.candidates}
    slo_of = {d.model: d.slo_s for d in demands}

    now = [0.0]
    settings: dict[str, Any] = {"policy": policy}
    if policy == "memadapt-v1":  # the rules' knobs, as the simulator's policy sets them
        v1 = get_policy("memadapt-v1")
        settings.update(ewma_halflife_s=v1.tau_s * math.log(2.0), hysteresis=v1.gain,
                        prefetch=v1.prefetch, schedule=v1.schedule, objective="misses")
    cache = VariantCache(
        store, device=device, backend=backend, budget=budget_bytes,
        floors={d.model: d.floor for d in demands},
        slos={d.model: d.slo_s for d in demands if d.slo_s is not None},
        candidates={d.model: list(d.candidates) for d in demands}, aliases=base_of,
        max_batch=batch, clock=lambda: now[0], threads=threads, swap_workers=0, trace_clock=True,
        rebalance_interval_s=None, pin_allocator=pin_allocator, **settings)
    plan_budget = cache.plan_budget
    log.info("simulating %d requests over %d models with %s", len(trace), len(demands), policy)
    sim = simulate(trace, demands, get_policy(policy), plan_budget)

    inputs = _inputs(store, demands, trace)
    names = trace.models
    ts = trace.timestamps.tolist()
    ms = trace.model.tolist()
    bs = trace.batch.tolist()
    n = len(ts)
    lat = np.full(n, np.nan)
    kind = np.zeros(n, dtype=np.int8)  # 0 hit, 1 miss, 2 stall
    acc = np.full(n, np.nan)
    slo = np.full(n, np.nan)
    hit_s: dict[str, list[float]] = {}
    errors: list[str] = []
    failures = 0
    every = max(1, n // 100)
    t_start = time.perf_counter()
    try:
        for i in range(n):
            if progress is not None and i % every == 0:
                progress(f"replaying ({policy})", i, n)
            name = names[ms[i]]
            x = inputs[name, bs[i]]
            now[0] = ts[i]
            try:
                r = cache.infer(name, x)
            except Exception as e:  # noqa: BLE001 - counted and reported, the replay goes on
                failures += 1
                if len(errors) < 5:
                    errors.append(f"request #{i} ({name}): {type(e).__name__}: {e}")
                continue
            lat[i] = r.latency_s + r.queued_s
            kind[i] = 2 if r.stalled else 1 if r.cold else 0
            if kind[i] == 0 and bs[i] == 1:
                hit_s.setdefault(r.variant, []).append(lat[i])
            acc[i] = acc_of[name, r.variant]
            if slo_of[name] is not None:
                slo[i] = slo_of[name]
        if progress is not None:
            progress(f"replaying ({policy})", n, n)
        stats = cache.stats()
    finally:
        cache.close()
    wall = time.perf_counter() - t_start

    ok = ~np.isnan(lat)
    served = int(ok.sum())
    waited = kind[ok] > 0
    on_time = np.where(np.isnan(slo[ok]), ~waited, lat[ok] <= np.nan_to_num(slo[ok]) + 1e-12)

    def share(x: np.ndarray) -> float:
        return float(x.mean()) if served else 0.0

    metrics = (
        ReplayMetric("miss_rate", sim.miss_rate, share(kind[ok] == 1)),
        ReplayMetric("stall_rate", sim.stall_rate, share(kind[ok] == 2)),
        ReplayMetric("slo_attainment", sim.slo_attainment, float(on_time.sum()) / n),
        ReplayMetric("mean_latency_s", sim.mean_latency_s, share(lat[ok])),
        ReplayMetric("p99_latency_s", sim.p99_latency_s,
                     float(np.percentile(lat[ok], 99)) if served else 0.0),
        ReplayMetric("mean_accuracy", sim.mean_accuracy, share(acc[ok])),
        ReplayMetric("evictions", float(sim.evictions), float(stats.evictions)),
        # swaps carried out on each side (a policy's own counters count those it began)
        ReplayMetric("downgrades", float(sim.downgrades), float(stats.downgrades)),
        ReplayMetric("upgrades", float(sim.upgrades), float(stats.upgrades)),
    )
    counts = {k: int(getattr(stats, k)) for k in (
        "requests", "hits", "misses", "stalls", "failures", "cold_loads", "prefetches",
        "downgrades", "upgrades", "evictions", "rebalances")}
    return ReplayReport(
        requests=n, served=served, failures=failures, rejected=sim.rejected,
        budget_bytes=budget_bytes, batch=batch, device=device, backend=backend,
        models=dict(sorted(base_of.items())), metrics=metrics, simulated=sim,
        real_counts=counts, wall_s=wall, errors=tuple(errors), policy=policy,
        plan_budget_bytes=plan_budget,
        runs=tuple(VariantRuns(v, len(t), lat_of[v], float(np.mean(t)))
                   for v, t in sorted(hit_s.items())))


def _head(trace: RequestTrace, n: int | None) -> RequestTrace:
    if n is None or n >= len(trace):
        return trace
    if n < 1:
        raise AdaptiveError(f"max_requests must be >= 1, got {n}")
    return RequestTrace(trace.timestamps[:n], trace.model[:n], trace.batch[:n], trace.models,
                        trace.source)


def _families(store: Any, candidates: Any, device: str, backend: str,
              batch: int) -> list[ModelDemand]:
    from adaptive.catalog import candidates_from_catalog

    if candidates is None:
        candidates = candidates_from_catalog(store, device=device, backend=backend, batch=batch)
    if isinstance(candidates, Mapping):
        fams = [ModelDemand(m, list(cs)) for m, cs in sorted(candidates.items())]
    else:
        fams = list(candidates)
        if not all(isinstance(d, ModelDemand) for d in fams):
            raise AdaptiveError("candidates must map models to Candidate lists or be a list of "
                                "ModelDemand families")
    if not fams:
        raise AdaptiveError("no candidates to replay with")
    for d in fams:
        if not d.candidates:
            raise AdaptiveError(f"model {d.model!r} has no candidates")
        missing = [c.variant for c in d.candidates if c.variant not in store]
        if missing:
            raise AdaptiveError(f"model {d.model!r}: candidates {missing} are not in the store "
                                f"{store.root}")
    return fams


def _inputs(store: Any, demands: Sequence[ModelDemand],
            trace: RequestTrace) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Each trace model's example inputs at every batch size it is asked for (the profiler's
    inputs: the family's ``example_inputs`` with seed 0), shared between models of one base."""
    from variants import get_family

    sizes: dict[str, set[int]] = {}
    for k, b in zip(trace.model.tolist(), trace.batch.tolist()):
        sizes.setdefault(trace.models[k], set()).add(b)
    made: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    out = {}
    for d in demands:
        m = store.get(d.candidates[0].variant)
        for b in sizes.get(d.model, ()):
            key = (m.base, b)
            if key not in made:
                tensors = get_family(m.family).example_inputs(m.arch, b, seed=0)
                names = [i["name"] for i in m.inputs]
                made[key] = {n: t.numpy() for n, t in zip(names, tensors)}
            out[d.model, b] = made[key]
    return out

