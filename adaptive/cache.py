"""The embeddable variant cache: serve ``infer(model, inputs)`` from a memory budget.

:class:`VariantCache` keeps at most one variant of each model resident, charges each the
memory its profile says it needs at the configured batch size, and follows a changing budget.
*What* to hold is a registered policy's decision (``CacheConfig.policy``): the simulator's
policies run for real through :class:`~adaptive.driver.PolicyDriver`
(:mod:`adaptive.cache_policy`), and ``memadapt-v1`` runs :mod:`adaptive.admission`'s
re-planning rules natively (:mod:`adaptive.cache_replan`). This module moves sessions, safely,
from small parts:

* :class:`~adaptive.ledger.ByteLedger`: every byte charged (sessions, loads in progress at
  their load peak, the host tier when it shares the budget), each shared group once. What is
  charged never exceeds the limit; a budget drop is *in force* (``budget``) once the charge is
  under it.
* sessions (:class:`_Entry`): each loaded session carries an in-flight count. A session that
  leaves residency is *retired*: new requests no longer see it, requests already running on it
  finish on it, and its bytes come back when the last one leaves.
* :class:`~adaptive.hosttier.HostTier`: what re-loads need, in host memory.
* :mod:`adaptive.cache_models`: each model's state, its candidates (the catalog's by default)
  and the default loader; :mod:`adaptive.cache_types`: results, counters and errors.

Concurrency: ``_lock`` guards every piece of shared state and is held only for bookkeeping
(and the policy's decisions, which are pure and fast), never during a model run or a load.
Loads run outside it: hits on other models go on while one model loads, and a miss loads on
its own thread, never queued behind another model's swap. Budget changes are applied one at a
time in the order they were made (``_budget_lock``). Every wait has a deadline
(``wait_timeout_s``) and its error names the model and what it waited for.

Clock, loader and budget source are injected, so tests use a fake clock and never sleep.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from adaptive.budget import BudgetSource, as_budget
from adaptive.cache_config import CacheConfig, config_from
from adaptive.cache_models import (
    CandidateSource,
    Loader,
    _batch_size,
    _checked_groups,
    _Model,
    _trim_allocator,
    catalog_candidates,
    default_loader,
)
from adaptive.cache_policy import PolicyRules
from adaptive.cache_replan import ReplanRules
from adaptive.cache_types import CacheStats, InferResult, ModelStats, UnknownModelError
from adaptive.errors import AdaptiveError, CacheTimeout
from adaptive.hosttier import HostTier
from adaptive.ledger import ByteLedger, Hold
from adaptive.select import Candidate
from adaptive.sessions import Entry as _Entry

__all__ = [
    "CacheConfig", "CacheStats", "CacheTimeout", "CandidateSource", "InferResult", "Loader",
    "ModelStats", "UnknownModelError", "VariantCache", "catalog_candidates", "default_loader",
]

log = logging.getLogger(__name__)


class VariantCache:
    """Serve many models from one memory budget, each as the variant its policy picks.

    ``VariantCache(store, config)``: ``store`` is a :class:`variants.Store` (or its path),
    ``config`` a :class:`~adaptive.cache_config.CacheConfig` (keyword settings are shorthand:
    ``VariantCache(store, budget="512MiB", policy="lru")``). Injected parts:

    * ``candidates`` (model -> :class:`Candidate` list naming stored variants) or
      ``profiles`` (a :data:`CandidateSource`; by default the profiler's catalog via
      :func:`catalog_candidates`); ``groups`` (group -> bytes) with
      :class:`~adaptive.sharing.SharedCandidate` candidates to account sharing a custom
      loader does;
    * ``loader(manifest, device, backend, source)`` opens sessions (default:
      :func:`default_loader`); ``clock`` (default :func:`time.monotonic`) is the time the
      policy decides on; ``audit(charged, budget)`` (tests, monitors) is called under the
      lock after every change of either.

    Each resident variant is charged its candidate's ``memory_bytes`` (the profile at
    ``max_batch``) and, while it loads, its ``load_peak_bytes``. ``infer`` refuses larger
    batches. Requests never fail for memory while some variant meeting their model's floor
    fits the budget; otherwise they raise :class:`~adaptive.errors.InfeasibleBudget`.
    """

    def __init__(self, store: Any, config: CacheConfig | None = None, *,
                 candidates: Mapping[str, Sequence[Candidate]] | None = None,
                 groups: Mapping[str, int] | None = None,
                 profiles: CandidateSource | None = None, loader: Loader | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 audit: Callable[[int, int], None] | None = None, **settings: Any):
        from variants.store import Store

        cfg = config_from(config, settings)
        self.config = cfg
        if cfg.share_weights and loader is not None:
            raise AdaptiveError("share_weights loads through the cache's tensor pool; drop "
                                "loader=, or account your loader's sharing with "
                                "SharedCandidate candidates and groups=")
        self.store = store if isinstance(store, Store) else Store(store)
        self.device = cfg.device
        self.backend = cfg.backend
        self.max_batch = cfg.max_batch
        self._clock = clock
        self._audit = audit
        if cfg.pin_allocator and cfg.device == "cpu":
            # The catalog's CPU figures were measured with glibc's mmap threshold pinned;
            # without it freed session-build memory stays resident (see profiler.memory).
            from profiler.memory import pin_allocator as _pin

            _pin()
        self._pool = None
        if cfg.share_weights:
            from variants.shared import TensorPool

            self._pool = TensorPool(cfg.device)
        if loader is None:
            def loader(manifest, device, backend, source, _threads=cfg.threads,
                       _pool=self._pool):
                return default_loader(manifest, device, backend, source, threads=_threads,
                                      pool=_pool)
        self._loader = loader

        if candidates is None:
            candidates = (profiles or catalog_candidates)(self.store, cfg.device, cfg.backend,
                                                          cfg.max_batch)
        self._models: dict[str, _Model] = {}
        self._manifests: dict[str, Any] = {}
        self._groups: dict[str, int] = {}
        self._build_models(candidates, dict(cfg.floors), dict(cfg.aliases), cfg.verify,
                           dict(groups or {}), cfg.share_weights)
        for i, st in enumerate(self._models.values()):
            st.index = i
        self._names = list(self._models)
        #: bytes kept back from the decisions for one load's transient peak
        self._headroom = (max((x for st in self._models.values() for x in st.excess),
                              default=0) if cfg.charge_load_peak else 0)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._budget_lock = threading.Lock()
        self._closed = False
        self._since = 0
        self._loading = 0  # loads in progress (their transient bytes settle when done)
        self._retired: set[_Entry] = set()  # out of service, still running requests
        self._counts = dict.fromkeys(
            ("requests", "hits", "misses", "stalls", "failures", "cold_loads", "prefetches",
             "downgrades", "upgrades", "evictions", "rebalances"), 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

        self._source = self._default_source() if cfg.budget is None else as_budget(cfg.budget)
        self._source.attach(self.resident_bytes)
        value = int(self._source())
        self._ledger = ByteLedger(value, self._groups)
        self._budget = value  # in force: charged bytes never exceed it
        host_cap = cfg.host_budget_bytes()
        self._host_shares_budget = cfg.keep_host_bytes and host_cap is None
        self._host_holds: dict[str, Hold] = {}
        self._host = HostTier(math.inf if host_cap is None else host_cap, self._host_size,
                              on_evict=self._host_evicted)
        rules = ReplanRules if cfg.replans else PolicyRules
        self._rules = rules(self)

    # -- construction ------------------------------------------------------------------------

    def _build_models(self, candidates: Mapping[str, Sequence[Candidate]],
                      floors: dict[str, float], aliases: dict[str, str], verify: bool,
                      groups: dict[str, int], share: bool) -> None:
        stored = set(self.store.names())
        # a group (variants.groups) is one model whose candidates are variants of several bases
        served = {g.name: set(g.members) for g in self.store.groups()}
        unknown = sorted(set(aliases) - set(candidates))
        if unknown:
            raise AdaptiveError(f"aliases name models {unknown} that have no candidates")
        checked: dict[str, list[Candidate]] = {}
        for model, cands in sorted(candidates.items()):
            base = aliases.get(model, model)
            cands = list(cands)
            if not cands:
                raise AdaptiveError(f"model {model!r} has no candidate variants")
            for c in cands:
                if not isinstance(c, Candidate):
                    raise AdaptiveError(f"model {model!r}: candidates must be adaptive.Candidate, "
                                        f"got {c!r}")
                if c.variant not in stored:
                    raise AdaptiveError(f"model {model!r}: candidate {c.variant!r} is not in the "
                                        f"store {self.store.root}; stored: "
                                        f"{', '.join(sorted(stored)) or 'none'}")
                manifest = self._manifests.get(c.variant)
                if manifest is None:
                    manifest = (self.store.verify(c.variant) if verify
                                else self.store.get(c.variant))
                if manifest.base != base and c.variant not in served.get(base, ()):
                    fix = (f"list it under its base or pass aliases={{{model!r}: "
                           f"{manifest.base!r}}}" if base == model else "fix aliases")
                    raise AdaptiveError(f"candidate {c.variant!r} belongs to model "
                                        f"{manifest.base!r}, not {base!r}; {fix}")
                self._manifests[c.variant] = manifest
            checked[model] = cands
        if share:
            if groups or any(getattr(c, "groups", None) for cs in checked.values() for c in cs):
                raise AdaptiveError("share_weights computes the shared groups itself; pass plain "
                                    "Candidates and no groups=")
            from adaptive.catalog import share_candidates

            checked, groups = share_candidates(self.store, checked, backend=self.backend,
                                               device=self.device)
        self._groups = _checked_groups(checked, groups)
        for model, cands in checked.items():
            floor = floors.pop(model, 0.0)
            try:
                self._models[model] = _Model(model, cands, float(floor), self._groups)
                self._models[model].demand(0.0)  # validates floor and duplicate variants
            except ValueError as e:
                raise AdaptiveError(str(e)) from None
            if not any(c.accuracy >= floor for c in cands):
                log.warning("model %r: no candidate meets its floor %g; its requests will fail",
                            model, floor)
        if floors:
            raise AdaptiveError(f"floors name unknown models {sorted(floors)}; the cache serves "
                                f"{sorted(self._models)}")
        slos = sorted(set(self.config.slos) - set(self._models))
        if slos:
            raise AdaptiveError(f"slos name unknown models {slos}; the cache serves "
                                f"{sorted(self._models)}")
        if not self._models:
            raise AdaptiveError("no models to serve: candidates is empty")

    def _default_source(self) -> BudgetSource:
        from adaptive.budget import CgroupBudget, CudaFreeBudget
        from variants.backends import parse_device

        kind, idx = parse_device(self.device)
        source: BudgetSource = CudaFreeBudget(idx) if kind == "cuda" else CgroupBudget()
        try:
            source()
        except AdaptiveError as e:
            raise AdaptiveError(f"no budget given and none can be read from the machine ({e}); "
                                f"pass budget= (bytes, '512MiB', a function or a BudgetSource)") \
                from None
        return source

    # -- public API ------------------------------------------------------------------------

    @property
    def models(self) -> tuple[str, ...]:
        """The models this cache serves."""
        return tuple(self._models)

    @property
    def objective(self) -> str:
        """The objective plans are made for (``CacheConfig.objective``)."""
        return self.config.objective

    @property
    def policy(self) -> str:
        """The registered policy deciding what is resident."""
        return self.config.policy

    @property
    def budget(self) -> int:
        """The budget in force, in bytes: charged bytes never exceed it."""
        with self._lock:
            return self._budget

    @property
    def plan_budget(self) -> int:
        """What the policy plans with: the budget less the headroom kept for one load's
        transient peak (``charge_load_peak``)."""
        with self._lock:
            return self.plan_limit()

    @property
    def budget_source(self) -> BudgetSource:
        return self._source

    @property
    def tensor_pool(self) -> Any:
        """The :class:`variants.shared.TensorPool` sessions load through with
        ``share_weights`` (its ``bytes()`` are the tensors really held), else None."""
        return self._pool

    @property
    def host_tier(self) -> HostTier:
        """The host tier (empty unless ``keep_host_bytes``)."""
        return self._host

    def resident_bytes(self) -> int:
        """Charged bytes: resident sessions, sessions draining, loads in progress and the host
        tier when it shares the budget."""
        with self._lock:
            return self._ledger.charged

    def resident(self) -> dict[str, str]:
        """Models with a resident variant, and that variant."""
        with self._lock:
            return {m: st.current.cand.variant for m, st in self._models.items()
                    if st.current is not None}

    def candidates(self, model: str) -> tuple[Candidate, ...]:
        """The candidates of ``model`` (raises :class:`UnknownModelError`)."""
        return self._model(model).cands

    def infer(self, model: str, inputs: Any) -> InferResult:
        """Run ``inputs`` on the resident variant of ``model``, loading one if needed.

        Thread-safe. Raises :class:`UnknownModelError` for a model not served,
        :class:`~adaptive.errors.InfeasibleBudget` when no variant meeting the model's floor
        fits the budget, :class:`~adaptive.errors.CacheTimeout` when a load it waits for
        does not finish within ``wait_timeout_s``, and whatever the session raises for bad
        inputs.
        """
        t0 = time.perf_counter()
        st = self._model(model)
        batch = _batch_size(inputs)
        if batch is not None and batch > self.max_batch:
            raise AdaptiveError(f"batch of {batch} for model {model!r} exceeds max_batch="
                                f"{self.max_batch}, the size memory is charged for; split it "
                                f"or build the cache with a larger max_batch")
        try:
            entry, kind, queued = self._rules.enter(st)
        except BaseException:
            with self._lock:
                self._counts["failures"] += 1
            raise
        try:
            output = entry.session.run(inputs)
        except BaseException:
            self._leave(entry, st, None)
            raise
        self._leave(entry, st, kind)
        result = InferResult(output, model, entry.cand.variant, kind != "hits",
                             time.perf_counter() - t0, stalled=kind == "stalls", queued_s=queued)
        self._rules.after_request()
        return result

    def set_budget(self, budget: Any) -> None:
        """Install a new budget (bytes, size string, function or source) and follow it now.

        Returns once the cache fits: on a drop, after the shed sessions have drained; raises
        :class:`~adaptive.errors.CacheTimeout` naming the models still running requests when
        that takes longer than ``wait_timeout_s`` (new loads are held to the new budget
        meanwhile). Budget changes apply in the order they were made.
        """
        source = as_budget(budget)
        source.attach(self.resident_bytes)
        with self._budget_lock:
            self._check_open()
            value = int(source())
            self._source = source
            self._rules.apply_budget(value)

    def refresh_budget(self) -> bool:
        """Read the budget source and follow it if it changed; True when it did."""
        with self._budget_lock:
            self._check_open()
            source = self._source
            try:
                value = int(source())
            except Exception as e:  # noqa: BLE001 - a flaky source must not stop serving
                log.warning("budget source %r failed: %s; keeping %d bytes", source, e,
                            self._ledger.limit)
                return False
            with self._lock:
                if value == self._ledger.limit:
                    return False
            self._rules.apply_budget(value)
            return True

    def evict(self, model: str) -> bool:
        """Take ``model`` out of memory now (its running requests finish first; the next
        request loads it again, as the policy decides). True if it was resident."""
        st = self._model(model)
        self._check_open()
        return self._rules.evict(st)

    def rebalance(self, *, force: bool = False) -> bool:
        """Re-plan now (``memadapt-v1``: with the current request rates, applying the plan
        unless it gains less than ``hysteresis``; other policies decide on every request and
        budget change, so this only completes the swaps they have due). True if it moved
        anything."""
        self._check_open()
        return self._rules.rebalance(force)

    def stats(self) -> CacheStats:
        """A consistent snapshot of counters and residency."""
        with self._lock:
            now = self._clock()
            models = {}
            for name, st in self._models.items():
                e = st.current
                models[name] = ModelStats(
                    model=name, variant=e.cand.variant if e else None, floor=st.floor,
                    accuracy=e.cand.accuracy if e else None,
                    served_accuracy=st.acc_sum / st.served if st.served else None,
                    requests=st.requests, hits=st.hits, memory_bytes=e.charge if e else 0,
                    rate=self._rules.rate(st, now))
            return CacheStats(**self._counts, bytes_resident=self._ledger.charged,
                              budget_bytes=self._budget, host_bytes=self._host.currsize,
                              models=MappingProxyType(models),
                              shared_bytes=self._ledger.held_groups(), policy=self.policy)

    def start(self) -> VariantCache:
        """Start the background thread that follows the budget source (and, with
        ``memadapt-v1``, re-plans every ``rebalance_interval_s``)."""
        with self._lock:
            if self._closed:
                raise AdaptiveError("the VariantCache is closed")
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="memadapt-cache",
                                            daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background threads and release every session once its requests finish
        (at most ``wait_timeout_s``; then :class:`~adaptive.errors.CacheTimeout` names the
        models still running requests, and their sessions are released when they finish)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._rules.close()
        for st in self._models.values():
            self._retire_current(st)
        with self._lock:
            self._host.clear()
        self._wait_charged(0, "closing the cache")

    def __enter__(self) -> VariantCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VariantCache({self.store.root}, models={len(self._models)}, "
                f"device={self.device!r}, policy={self.policy!r}, budget={self._budget})")

    # -- requests ------------------------------------------------------------------------------

    def _model(self, model: str) -> _Model:
        st = self._models.get(model)
        if st is None:
            raise UnknownModelError(f"unknown model {model!r}; this cache serves "
                                    f"{', '.join(sorted(self._models))}")
        return st

    def _check_open(self) -> None:
        if self._closed:
            raise AdaptiveError("the VariantCache is closed")

    def _hit(self, st: _Model, now: float) -> tuple[str, float]:
        """Lock held: how a request finding ``st`` resident at ``now`` counts: a hit, unless
        the load that made it resident ended after ``now`` on the clock (see
        :attr:`InferResult.queued_s`)."""
        if now < st.ready_at and self.config.trace_clock:
            return st.ready_kind, st.ready_at - now
        return "hits", 0.0

    def _count_request(self, st: _Model) -> None:
        """Lock held: a request arrived for ``st``."""
        if self._closed:
            raise AdaptiveError("the VariantCache is closed")
        self._counts["requests"] += 1
        st.requests += 1

    def _leave(self, entry: _Entry, st: _Model, kind: str | None) -> None:
        """Check a request out of ``entry``; release the entry if it was its last user."""
        with self._lock:
            entry.inflight -= 1
            if kind is None:
                self._counts["failures"] += 1
            else:
                self._counts[kind] += 1
                if kind == "hits":
                    st.hits += 1
                st.served += 1
                st.acc_sum += entry.cand.accuracy
            release = entry.retired and entry.inflight == 0 and not entry.releasing
            if release:
                entry.releasing = True
            self._notify_audit()
        if release:
            self._release(entry)

    def _deadline(self) -> float:
        return time.monotonic() + self.config.wait_timeout_s

    def _wait(self, deadline: float, what: str) -> None:
        """Lock held: wait for a change, or raise :class:`CacheTimeout` saying ``what``."""
        left = deadline - time.monotonic()
        if left <= 0 or not self._cond.wait(left) and time.monotonic() >= deadline:
            raise CacheTimeout(f"{what}: gave up after {self.config.wait_timeout_s:g} s "
                               f"(wait_timeout_s); {self._busy()}")

    def _busy(self) -> str:
        """Lock held: what is holding memory or requests, for a timeout's message."""
        running = sorted({f"{e.model} ({e.cand.variant}, {e.inflight} running)"
                          for e in self._entries() if e.inflight})
        return ("requests still running on " + ", ".join(running) if running
                else f"{self._loading} loads in progress")

    def _entries(self) -> list[_Entry]:
        """Lock held: every entry holding a session, resident or retired."""
        return [st.current for st in self._models.values() if st.current is not None] + \
            list(self._retired)

    def _wait_charged(self, value: int, what: str) -> None:
        """Wait until at most ``value`` bytes are charged (dropping host-tier entries first)."""
        deadline = self._deadline()
        with self._lock:
            while self._ledger.charged > value:
                if self._host_holds:
                    self._host.popitem()
                    continue
                self._wait(deadline, f"{what}: {self._ledger.charged} bytes still charged, "
                                     f"over {value}")

    def _limit_to(self, value: int) -> int:
        """Lock held: hold new loads to ``value`` at once; publish it as the budget in force
        now if it is a rise or already met. Returns the budget in force before."""
        old = self._budget
        self._ledger.limit = value
        if value >= old or self._ledger.charged <= value:
            self._budget = value
            self._notify_audit()
        return old

    def _enforce(self, value: int) -> None:
        """Wait until the charge is under ``value`` (with the deadline), then publish it."""
        self._wait_charged(value, f"following the budget drop to {value} bytes")
        with self._lock:
            self._budget = value
            self._notify_audit()

    # -- memory --------------------------------------------------------------------------------

    def plan_limit(self) -> int:
        """Lock held: the bytes decisions may plan with (the limit less one load's peak)."""
        return max(0, self._ledger.limit - self._headroom)

    def _reserve(self, st: _Model, cand: Candidate, *, wait: bool = True,
                 deadline: float | None = None,
                 abandoned: Callable[[], bool] | None = None) -> Hold | None:
        """Charge a load of ``cand`` (at its load peak) if it fits under the limit, dropping
        host-tier entries first. Waits (until ``deadline``) while draining sessions or loads
        in progress would make it fit; None when nothing would (or ``wait`` is False and it
        does not fit now, or ``abandoned()`` says the load is no longer wanted)."""
        k = st.index_of[cand.variant]
        private = st.private[k] + (st.excess[k] if self.config.charge_load_peak else 0)
        needs = st.needs[k]
        deadline = self._deadline() if deadline is None else deadline
        led = self._ledger
        with self._lock:
            while True:
                hold = led.reserve(private, needs, f"{st.name}:{cand.variant}")
                if hold is not None:
                    self._loading += 1
                    self._notify_audit()
                    return hold
                if self._host_holds:
                    self._host.popitem()
                    continue
                freed = self._rules.make_room()
                if freed:  # the policy had already let these go: release them, try again
                    self._lock.release()
                    try:
                        for e in freed:
                            self._release(e)
                    finally:
                        self._lock.acquire()
                    continue
                if not wait or not (led.freeable() > 0 or self._loading > 0) or (
                        abandoned is not None and abandoned()):
                    return None
                self._wait(deadline, f"loading {cand.variant!r} for {st.name!r}: "
                                     f"{led.cost(private, needs)} bytes do not fit under "
                                     f"{led.limit} with {led.charged} charged")

    def _loaded(self, st: _Model, cand: Candidate, hold: Hold) -> None:
        """Lock held: a load finished; its charge settles from the load peak to steady."""
        self._loading -= 1
        self._ledger.resize(hold, st.private[st.index_of[cand.variant]])
        self._notify_audit()
        self._cond.notify_all()

    def _unreserve(self, hold: Hold, *, loading: bool = True) -> None:
        """Lock held: give back a reservation whose load failed or was abandoned."""
        if loading:
            self._loading -= 1
        self._ledger.release(hold)
        self._notify_audit()
        self._cond.notify_all()

    def _notify_audit(self) -> None:
        if self._audit is not None:
            self._audit(self._ledger.charged, self._budget)

    # -- sessions ------------------------------------------------------------------------------

    def _open(self, cand: Candidate) -> Any:
        """Open a session of ``cand`` (from the host tier when it holds it)."""
        from variants.backends import host_form

        manifest = self._manifests[cand.variant]
        source = None
        if self.config.keep_host_bytes:
            with self._lock:
                source = self._host.get(cand.variant)
            if source is None:
                source = host_form(manifest, self.backend, self.device)
                if source is not None:
                    self._keep_in_host(cand.variant, source)
        t0 = time.perf_counter()
        session = self._loader(manifest, self.device, self.backend, source)
        log.debug("loaded %r in %.1f ms", cand.variant, 1e3 * (time.perf_counter() - t0))
        return session

    def _host_size(self, form: Any) -> int:
        from variants.backends import host_nbytes

        return host_nbytes(form)

    def _keep_in_host(self, variant: str, form: Any) -> None:
        """Add to the host tier: within its own ``host_budget``, or charged to the budget
        when it fits there now (a host entry never makes a load wait)."""
        with self._lock:
            if variant in self._host:
                return
            if self._host_shares_budget:
                hold = self._ledger.reserve(self._host_size(form), (), f"host:{variant}")
                if hold is None:
                    return
                self._host_holds[variant] = hold
                self._notify_audit()
            self._host[variant] = form

    def _host_evicted(self, variant: str, form: Any) -> None:
        """Lock held (HostTier callback): an entry left the tier; uncharge it."""
        hold = self._host_holds.pop(variant, None)
        if hold is not None:
            self._ledger.release(hold)
            self._notify_audit()
            self._cond.notify_all()

    def started(self) -> tuple[float, float]:
        """When a load starts: (the cache's clock, the wall clock); see :meth:`_install`."""
        return self._clock(), time.perf_counter()

    def _install(self, st: _Model, cand: Candidate, session: Any, hold: Hold,
                 kind: str, started: tuple[float, float] | None = None,
                 ended: float | None = None) -> _Entry | None:
        """Lock held: make a loaded session current; return the old entry if the caller must
        release it now. A load that requests waited for (nothing was serving) records when it
        ended on the cache's clock: its start there plus the wall time it took (until
        ``ended`` on the wall clock, default now)."""
        entry = _Entry(st.name, cand, session, hold)
        old = st.current
        if old is None and started is not None:
            end = time.perf_counter() if ended is None else ended
            st.ready_at = started[0] + (end - started[1])
            st.ready_kind = "stalls" if st.stalling else "misses"
        if kind in ("cold_loads", "prefetches"):  # newly resident (a swap keeps its place)
            self._since += 1
            st.since = self._since
        st.current = entry
        st.stalling = False
        self._counts[kind] += 1
        release = self._retire(old) if old is not None else None
        self._cond.notify_all()
        return release

    def _retire_current(self, st: _Model) -> bool:
        with self._lock:
            old = st.current
            if old is None:
                return False
            release = self._retire(old)
        if release is not None:
            self._release(release)
        return True

    def _retire(self, entry: _Entry) -> _Entry | None:
        """Lock held: take ``entry`` out of service; return it if the caller must release
        it now (nobody is running on it)."""
        entry.retired = True
        st = self._models[entry.model]
        if st.current is entry:
            st.current = None
        self._ledger.retire(entry.hold)
        self._retired.add(entry)
        if entry.inflight == 0 and not entry.releasing:
            entry.releasing = True
            return entry
        return None

    def _release(self, entry: _Entry) -> None:
        """Close a drained session, then give its bytes back (in that order, so the memory is
        free before anything else may be charged to it)."""
        session, entry.session = entry.session, None
        try:
            if session is not None:
                session.close()
        except Exception as e:  # noqa: BLE001 - the bytes must come back regardless
            log.warning("closing %r failed: %s", entry.cand.variant, e)
        del session
        with self._lock:
            self._retired.discard(entry)
            self._ledger.release(entry.hold)
            self._notify_audit()
            self._cond.notify_all()
        _trim_allocator(self.device)

    # -- background thread ------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.rebalance_interval_s if self.config.replans else None
        poll = min(self.config.budget_poll_s, interval) if interval else self.config.budget_poll_s
        next_plan = time.monotonic() + interval if interval else math.inf
        while not self._stop.wait(poll):
            try:
                changed = self._source.dynamic and self.refresh_budget()
                if interval and time.monotonic() >= next_plan:
                    if not changed:
                        self.rebalance()
                    next_plan = time.monotonic() + interval
            except Exception:  # noqa: BLE001 - the thread must outlive a bad re-plan
                if self._closed:
                    return
                log.exception("background re-plan failed")
