"""The embeddable variant cache: serve ``infer(model, inputs)`` from a memory budget.

:class:`VariantCache` keeps at most one variant of each model resident, charges each the
memory its profile says it needs at the configured batch size, and follows a changing budget
by *downgrading* models to smaller variants (never below their accuracy floor) before it
evicts any, and upgrading them again when memory returns. What to hold is decided by
:mod:`adaptive.admission` (the same decisions the simulator's ``memadapt`` policy makes, on
top of :func:`adaptive.select`); this module only moves sessions, safely.

Concurrency model (one owner, one lock):

* ``_lock`` guards every piece of shared state (residency, accounting, counters, rates) and
  is held only for short bookkeeping, never during a model run or a load.
* Transitions (loads, swaps, evictions, budget changes) are made by one *planner* at a time,
  a flag under ``_lock``. Loads therefore happen outside ``_lock``: hits on other models go on
  while one model loads. Requests for a model that is being loaded wait on one pending load
  (no thundering herd).
* Every loaded session carries an in-flight count. A session that leaves residency is
  *retired*: new requests no longer see it, requests already running on it finish on it, and
  its memory is released when the last one leaves. Its bytes stay accounted until then.
* Accounting: ``resident_bytes()`` is the sum of the charges of every session holding memory
  (resident, draining, or being loaded). It never exceeds ``budget``: a load reserves its
  charge before it starts and only if it fits, and a budget drop is published only once the
  shed sessions have drained (``set_budget`` returns then), while new loads are already held
  to the lower figure.
* Swaps are make-before-break when the new variant fits beside the old one (load, switch the
  pointer, retire the old) and break-before-make otherwise (retire the old first, so requests
  for that model wait for the new one instead of failing).
* Shared memory (``share_weights``, or :class:`~adaptive.sharing.SharedCandidate` candidates
  with ``groups``): a variant is charged its private bytes, and each shared group (a frozen
  backbone two task models use, the prefix a full model and its exit variant have in common)
  once while any session holding memory needs it. A load is charged only the groups nobody
  holds yet; a group's bytes come back when its last holder is released. The decisions see,
  per model, what each of its candidates would add to what the *other* residents hold: exact
  for one model's swap, and never optimistic when several move at once (a group two of them
  drop is not counted as freed, and the groups a model being admitted could use are kept).
  Re-plans use :func:`adaptive.sharing.select_shared`, which charges each group once.

Clock, loader and budget source are injected, so tests use a fake clock and never sleep.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from adaptive.admission import (
    Ladders,
    Move,
    Rates,
    ReplanSchedule,
    admit,
    apply_targets,
    plan_choice,
    shed,
    worth_applying,
)
from adaptive.budget import BudgetSource, as_budget
from adaptive.errors import AdaptiveError
from adaptive.select import OBJECTIVES, Candidate, ModelDemand, check_feasible

__all__ = [
    "CacheStats", "CandidateSource", "InferResult", "Loader", "ModelStats", "UnknownModelError",
    "VariantCache", "catalog_candidates", "default_loader",
]

log = logging.getLogger(__name__)

#: (store, device, backend, max_batch) -> {model: candidates}; see :func:`catalog_candidates`.
CandidateSource = Callable[[Any, str, str, int], Mapping[str, Sequence[Candidate]]]
#: (manifest, device, backend, source_bytes or None) -> a session with ``run(inputs)``.
Loader = Callable[[Any, str, str, "bytes | None"], Any]

_LN2 = math.log(2.0)


class UnknownModelError(AdaptiveError, KeyError):
    """``infer`` named a model the cache does not serve."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class InferResult:
    """One served request: the output and which variant produced it.

    ``cold`` is True when the model was not resident when the request arrived (it waited for
    a load); ``latency_s`` is the wall time of the whole ``infer`` call, waiting included.
    """

    output: Any
    model: str
    variant: str
    cold: bool
    latency_s: float


@dataclass(frozen=True)
class ModelStats:
    """One model's residency and service so far (``memory_bytes``: what its resident variant
    is charged beyond the shared groups it uses)."""

    model: str
    variant: str | None
    floor: float
    accuracy: float | None
    served_accuracy: float | None
    requests: int
    hits: int
    memory_bytes: int
    rate: float


@dataclass(frozen=True)
class CacheStats:
    """Counters since construction and the state now.

    ``requests = hits + misses + failures``: a hit ran on a resident variant at once, a miss
    waited for a load first, a failure raised. ``cold_loads`` counts loads that requests
    triggered (one per load however many requests waited on it), ``prefetches`` loads that
    re-plans made for models not resident. ``host_bytes`` is the host tier (ONNX bytes kept
    for fast re-loads), charged to ``host_budget`` instead of the budget. With shared
    memory, ``bytes_resident`` counts each held group once: it is the models'
    ``memory_bytes`` (private) plus ``shared_bytes`` (the groups held), loads and draining
    sessions included.
    """

    requests: int
    hits: int
    misses: int
    failures: int
    cold_loads: int
    prefetches: int
    downgrades: int
    upgrades: int
    evictions: int
    rebalances: int
    bytes_resident: int
    budget_bytes: int
    host_bytes: int
    models: Mapping[str, ModelStats]
    shared_bytes: int = 0

    @property
    def swaps(self) -> int:
        """Downgrades plus upgrades."""
        return self.downgrades + self.upgrades


def default_loader(manifest: Any, device: str, backend: str, source_bytes: bytes | None, *,
                   threads: int | None = None, pool: Any = None) -> Any:
    """Open a stored variant with the registered ``backend`` (from bytes when given; through
    the tensor ``pool`` when given, torch only)."""
    from variants.backends import get_backend

    extra = {} if pool is None else {"pool": pool}
    return get_backend(backend)(manifest, device=device, threads=threads, source=source_bytes,
                                **extra)


def catalog_candidates(store: Any, device: str, backend: str,
                       max_batch: int) -> dict[str, list[Candidate]]:
    """Candidates per model from the profiler's catalog, memory at ``max_batch``.

    The default :data:`CandidateSource`: ``adaptive.catalog.candidates_from_catalog``, which
    raises an :class:`AdaptiveError` naming ``memadapt profile`` when nothing is profiled.
    """
    fix = (f"run `memadapt profile {getattr(store, 'root', store)} --device {device}` first, or "
           f"pass candidates= to VariantCache")
    try:
        from adaptive.catalog import candidates_from_catalog
    except ImportError as e:
        raise AdaptiveError(f"no profiles to choose variants with (adaptive.catalog is not "
                            f"available: {e}); {fix}") from None
    got = candidates_from_catalog(store, device=device, backend=backend, batch=max_batch)
    out = {m: list(c) for m, c in got.items() if c}
    if not out:
        raise AdaptiveError(f"the catalog of {getattr(store, 'root', store)} has no profiles for "
                            f"device {device!r}, backend {backend!r}; {fix}")
    return out


class _Entry:
    """One loaded session of one variant; ``inflight`` requests are running on it."""

    __slots__ = ("model", "cand", "session", "charge", "groups", "inflight", "retired",
                 "releasing")

    def __init__(self, model: str, cand: Candidate, session: Any, charge: int,
                 groups: frozenset[str]):
        self.model = model
        self.cand = cand
        self.session = session
        self.charge = charge  # private bytes; the shared groups are charged once, by group
        self.groups = groups
        self.inflight = 0
        self.retired = False
        self.releasing = False


class _Pending:
    """A load some request asked for; other requests for the model wait on it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None


class _Model:
    """Per-model state, all guarded by the cache's lock."""

    __slots__ = ("name", "index", "cands", "shared", "private", "needs", "index_of", "floor",
                 "current", "pending", "since", "requests", "hits", "served", "acc_sum")

    def __init__(self, name: str, cands: Sequence[Candidate], floor: float,
                 groups: Mapping[str, int]):
        self.name = name
        self.index = -1  # position in the cache's model order (the decisions' numbering)
        # ``shared``: as given (private bytes + groups); ``cands``: each as if alone (private
        # + every group it needs), what a model costs in an otherwise empty cache.
        self.shared = tuple(cands)
        self.private = tuple(int(c.memory_bytes) for c in self.shared)
        self.needs = tuple(frozenset(getattr(c, "groups", ())) for c in self.shared)
        self.cands = tuple(
            c if not n else Candidate(c.variant, p + sum(groups[g] for g in n), c.accuracy,
                                      c.latency_s, c.load_s)
            for c, p, n in zip(self.shared, self.private, self.needs))
        self.index_of = {c.variant: k for k, c in enumerate(self.cands)}
        self.floor = floor
        self.current: _Entry | None = None
        self.pending: _Pending | None = None
        self.since = 0  # when it last became resident (a sequence number): residency order
        self.requests = 0
        self.hits = 0
        self.served = 0
        self.acc_sum = 0.0

    def demand(self, rate: float, cands: Sequence[Candidate] | None = None) -> ModelDemand:
        return ModelDemand(self.name, self.cands if cands is None else cands, self.floor, rate)


class VariantCache:
    """Serve many models from one memory budget, each as the best variant that fits.

    ``store`` is a :class:`variants.Store` (or its path); its models are the manifests' bases.
    Candidates per model come from ``candidates`` (model -> :class:`Candidate` list naming
    stored variants) or from ``profiles`` (a :data:`CandidateSource`; by default the
    profiler's catalog via :func:`catalog_candidates`). ``aliases`` maps a served model name
    to the stored base its candidates belong to, so several models (say, fine-tuned copies)
    can be served from the same files, each with its own session and memory. Each resident
    variant is charged its candidate's ``memory_bytes``, the profile at ``max_batch``;
    ``infer`` refuses larger batches. ``floors`` maps models to accuracy floors (default 0).

    ``budget`` is bytes, a size string, a source name (``"cgroup"``, ``"cuda-free"``), a
    function or a :class:`BudgetSource`; by default free CUDA memory on ``cuda`` devices and
    the cgroup limit on ``cpu``. What to load, downgrade or evict is decided by
    :mod:`adaptive.admission`, the simulator's ``memadapt`` rules: a miss downgrades the
    cheapest residents before it evicts the coldest, a budget drop likewise. Rates are EWMAs
    of observed requests (half-life ``ewma_halflife_s`` on ``clock``). ``rebalance()``
    re-plans with :func:`adaptive.select` (``objective``) and applies the plan when the
    residency it leads to gains more than ``hysteresis`` (a fraction of the requests served
    from memory, then of the utility), unless forced; ``prefetch`` lets a re-plan load models
    that are not resident. Re-plans happen on budget changes, on ``rebalance()``, in the
    background thread (``start()``, or use the cache as a context manager; it polls the
    budget source every ``budget_poll_s`` and re-plans every ``rebalance_interval_s``, never
    when None) and, with ``schedule`` (a :class:`~adaptive.admission.ReplanSchedule`), on
    request arrivals in ``clock`` time, as the simulator does.

    ``share_weights`` (torch backend) hosts the variants in one content-addressed
    :class:`variants.shared.TensorPool`: every tensor two resident variants have in common
    (task models on one frozen backbone, a model's full and exit variants, aliases of one
    model) is held once, and the accounting charges it once (see the module docstring);
    the groups are read from the variants' safetensors (``variants.shared.sharing_groups``).
    Alternatively pass :class:`~adaptive.sharing.SharedCandidate` candidates and ``groups``
    (group name -> bytes) to account sharing your own loader does.

    ``pin_allocator`` (CPU) pins glibc's mmap threshold as the profiler did, so resident
    memory follows the catalog. ``loader(manifest, device, backend, source_bytes)`` opens
    sessions (default:
    :func:`default_loader` with ``threads``); ``keep_host_bytes`` keeps each loaded
    variant's ONNX bytes in host memory so a re-load skips the disk: the *host tier*,
    bounded by ``host_budget`` (bytes or a size string; None: unbounded), least recently
    loaded out first; a variant larger than the host budget is not kept. ``verify`` checks every
    candidate's files against their sha256 once, here, instead of at every load. ``audit``
    (for tests and monitors) is called under the lock with ``(resident_bytes, budget_bytes)``
    after every change of either and after every request.
    """

    def __init__(self, store: Any, *, device: str = "cpu", backend: str = "onnxruntime",
                 budget: Any = None, floors: Mapping[str, float] | None = None,
                 candidates: Mapping[str, Sequence[Candidate]] | None = None,
                 profiles: CandidateSource | None = None, max_batch: int = 8,
                 loader: Loader | None = None, clock: Callable[[], float] = time.monotonic,
                 rebalance_interval_s: float | None = None, budget_poll_s: float = 1.0,
                 hysteresis: float = 0.1, ewma_halflife_s: float = 30.0,
                 objective: str = "misses", threads: int | None = None,
                 keep_host_bytes: bool = False, host_budget: Any = None, verify: bool = True,
                 audit: Callable[[int, int], None] | None = None, pin_allocator: bool = True,
                 prefetch: bool = True, schedule: ReplanSchedule | None = None,
                 aliases: Mapping[str, str] | None = None, share_weights: bool = False,
                 groups: Mapping[str, int] | None = None):
        from variants.backends import list_backends, parse_device
        from variants.store import Store

        if objective not in OBJECTIVES:
            raise AdaptiveError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        if backend not in list_backends():
            raise AdaptiveError(f"unknown backend {backend!r}; known: {', '.join(list_backends())}")
        parse_device(device)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise AdaptiveError(f"max_batch must be an int >= 1, got {max_batch!r}")
        for name, v in (("ewma_halflife_s", ewma_halflife_s), ("budget_poll_s", budget_poll_s)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise AdaptiveError(f"{name} must be > 0 seconds, got {v!r}")
        if rebalance_interval_s is not None and not rebalance_interval_s > 0:
            raise AdaptiveError(f"rebalance_interval_s must be > 0 seconds or None, got "
                                f"{rebalance_interval_s!r}")
        if not (isinstance(hysteresis, (int, float)) and hysteresis >= 0):
            raise AdaptiveError(f"hysteresis must be >= 0 (a fraction of the current utility), "
                                f"got {hysteresis!r}")
        if schedule is not None and not isinstance(schedule, ReplanSchedule):
            raise AdaptiveError(f"schedule must be an adaptive.admission.ReplanSchedule or None, "
                                f"got {schedule!r}")
        if keep_host_bytes and backend != "onnxruntime":
            raise AdaptiveError(f"keep_host_bytes needs the onnxruntime backend (it re-opens "
                                f"sessions from ONNX bytes), not {backend!r}")
        if share_weights and backend != "torch":
            raise AdaptiveError(f"share_weights needs backend='torch' (onnxruntime sessions "
                                f"cannot share tensors), not {backend!r}")
        if share_weights and loader is not None:
            raise AdaptiveError("share_weights loads through the cache's tensor pool; drop "
                                "loader=, or account your loader's sharing with "
                                "SharedCandidate candidates and groups=")

        self.store = store if isinstance(store, Store) else Store(store)
        self.device = device
        self.backend = backend
        self.max_batch = max_batch
        self.objective = objective
        self.hysteresis = float(hysteresis)
        self.prefetch = bool(prefetch)
        self.schedule = schedule
        self.rebalance_interval_s = rebalance_interval_s
        self.budget_poll_s = float(budget_poll_s)
        self._clock = clock
        self._keep_host = keep_host_bytes
        self._host_budget: int | None = None
        if host_budget is not None:
            if not keep_host_bytes:
                raise AdaptiveError("host_budget bounds the host tier; pass keep_host_bytes=True "
                                    "too")
            from adaptive.units import parse_size

            try:
                self._host_budget = parse_size(host_budget)
            except ValueError as e:
                raise AdaptiveError(f"host_budget: {e}") from None
        self._audit = audit
        if pin_allocator and device == "cpu":
            # The catalog's CPU figures were measured with glibc's mmap threshold pinned;
            # without it freed session-build memory stays resident and the process uses
            # 1.2-2.3x what the budget accounts for (see profiler.memory).
            from profiler.memory import pin_allocator as _pin

            _pin()
        self._pool = None
        if share_weights:
            from variants.shared import TensorPool

            self._pool = TensorPool(device)
        if loader is None:
            def loader(manifest, device, backend, source_bytes, _threads=threads,
                       _pool=self._pool):
                return default_loader(manifest, device, backend, source_bytes, threads=_threads,
                                      pool=_pool)
        self._loader = loader

        if candidates is None:
            candidates = (profiles or catalog_candidates)(self.store, device, backend, max_batch)
        self._models: dict[str, _Model] = {}
        self._manifests: dict[str, Any] = {}
        self._groups: dict[str, int] = {}
        self._build_models(candidates, dict(floors or {}), dict(aliases or {}), verify,
                           dict(groups or {}), share_weights)
        for i, st in enumerate(self._models.values()):
            st.index = i
        self._names = list(self._models)
        self._ladders = Ladders([st.demand(0.0) for st in self._models.values()])
        self._rates = Rates(len(self._names), float(ewma_halflife_s) / _LN2)
        self._targets = [-1] * len(self._names)  # candidate per model from the last re-plan
        self._timer = schedule.timer() if schedule is not None else None
        self._since = 0

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._planning = False
        self._closed = False
        self._charged = 0  # bytes of every session holding memory, reservations included
        self._draining = 0  # of which: private bytes of retired sessions still running requests
        # holders of each shared group: sessions holding memory (reservations included), and
        # of those the ones not retired; a group is charged while it has any holder
        self._group_all: dict[str, int] = dict.fromkeys(self._groups, 0)
        self._group_live: dict[str, int] = dict.fromkeys(self._groups, 0)
        self._host: OrderedDict[str, bytes] = OrderedDict()  # least recently loaded first
        self._counts = dict.fromkeys(
            ("requests", "hits", "misses", "failures", "cold_loads", "prefetches",
             "downgrades", "upgrades", "evictions", "rebalances"), 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

        self._source = self._default_source() if budget is None else as_budget(budget)
        self._source.attach(self.resident_bytes)
        value = int(self._source())
        self._budget = value  # in force: resident bytes never exceed it
        self._limit = value  # target: what new loads are held to (lower while shedding)

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

            checked, groups = share_candidates(self.store, checked)
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
    def budget(self) -> int:
        """The budget in force, in bytes: resident bytes never exceed it."""
        with self._lock:
            return self._budget

    @property
    def budget_source(self) -> BudgetSource:
        return self._source

    @property
    def tensor_pool(self) -> Any:
        """The :class:`variants.shared.TensorPool` sessions load through with
        ``share_weights`` (its ``bytes()`` are the tensors really held), else None."""
        return self._pool

    def resident_bytes(self) -> int:
        """Accounted bytes: resident sessions, sessions draining and loads in progress."""
        with self._lock:
            return self._charged

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
        :class:`InfeasibleBudget` when no variant meeting the model's floor fits the budget,
        and whatever the session raises for bad inputs.
        """
        t0 = time.perf_counter()
        st = self._model(model)
        batch = _batch_size(inputs)
        if batch is not None and batch > self.max_batch:
            raise AdaptiveError(f"batch of {batch} for model {model!r} exceeds max_batch="
                                f"{self.max_batch}, the size memory is charged for; split it "
                                f"or build the cache with a larger max_batch")
        with self._lock:
            if self._closed:
                raise AdaptiveError("the VariantCache is closed")
            self._counts["requests"] += 1
            st.requests += 1
            now = self._clock()
            self._rates.seen(st.index, now)
            timer = self._timer
            due = timer is not None and timer.due(now) and \
                timer.check(now, lambda: self._rates.rates(now)) is not None
            entry = None if due else st.current
            if entry is not None:
                entry.inflight += 1
        if due:  # the schedule's re-plan comes before this request is served, as simulated
            try:
                self.rebalance()
            except Exception:  # noqa: BLE001 - a failed re-plan must not fail the request
                log.exception("scheduled re-plan failed")
            with self._lock:
                entry = st.current
                if entry is not None:
                    entry.inflight += 1
        cold = entry is None
        if entry is None:
            try:
                entry = self._acquire_cold(st)
            except BaseException:
                with self._lock:
                    self._counts["failures"] += 1
                raise
        try:
            output = entry.session.run(inputs)
        except BaseException:
            self._leave(entry, st, None)
            raise
        self._leave(entry, st, cold)
        return InferResult(output, model, entry.cand.variant, cold, time.perf_counter() - t0)

    def set_budget(self, budget: Any) -> None:
        """Install a new budget (bytes, size string, function or source) and follow it now.

        Returns once the cache fits: on a drop, after the shed sessions have drained.
        """
        source = as_budget(budget)
        source.attach(self.resident_bytes)
        value = int(source())
        with self._planner():
            self._source = source
            self._apply_budget(value)

    def refresh_budget(self) -> bool:
        """Read the budget source and follow it if it changed; True when it did."""
        if self._closed:
            raise AdaptiveError("the VariantCache is closed")
        try:
            value = int(self._source())
        except Exception as e:  # noqa: BLE001 - a flaky source must not stop serving
            log.warning("budget source %r failed: %s; keeping %d bytes", self._source, e,
                        self._limit)
            return False
        with self._lock:
            if value == self._limit:
                return False
        with self._planner():
            if value == self._limit:
                return False
            self._apply_budget(value)
        return True

    def rebalance(self, *, force: bool = False) -> bool:
        """Re-plan with the current request rates and execute the swaps; True if it did.

        Skipped (False) when the plan would gain less than ``hysteresis`` times the current
        utility, unless ``force`` or the current residency exceeds the budget.
        """
        with self._planner():
            return self._rebalance(force)

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
                    rate=self._rates.rate(st.index, now))
            return CacheStats(**self._counts, bytes_resident=self._charged,
                              budget_bytes=self._budget,
                              host_bytes=sum(len(b) for b in self._host.values()),
                              models=MappingProxyType(models),
                              shared_bytes=sum(b for g, b in self._groups.items()
                                               if self._group_all[g]))

    def start(self) -> VariantCache:
        """Start the background thread that follows the budget source and re-plans."""
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
        """Stop the background thread and release every session (after in-flight requests)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._planner(closing=True):
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                self._cond.notify_all()
            for st in self._models.values():
                self._retire_current(st)
            with self._lock:
                while self._charged > 0:
                    self._cond.wait()
                self._host.clear()

    def __enter__(self) -> VariantCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VariantCache({self.store.root}, models={len(self._models)}, "
                f"device={self.device!r}, budget={self._budget})")

    # -- requests ------------------------------------------------------------------------------

    def _model(self, model: str) -> _Model:
        st = self._models.get(model)
        if st is None:
            raise UnknownModelError(f"unknown model {model!r}; this cache serves "
                                    f"{', '.join(sorted(self._models))}")
        return st

    def _acquire_cold(self, st: _Model) -> _Entry:
        """Wait for (or make) a load of ``st``; return its entry with a request checked in."""
        with self._lock:
            while True:
                if self._closed:
                    raise AdaptiveError("the VariantCache is closed")
                entry = st.current
                if entry is not None:
                    entry.inflight += 1
                    return entry
                p = st.pending
                if p is not None:  # someone else's load: wait for it or for residency
                    while st.current is None and not p.done and not self._closed:
                        self._cond.wait()
                    if st.current is None and p.done and p.error is not None:
                        raise p.error
                    continue
                p = st.pending = _Pending()
                if not self._acquire_planner(st):  # became resident meanwhile
                    self._finish_pending(st, p, None)
                    continue
                self._lock.release()
                err: BaseException | None = None
                try:
                    self._admit(st)
                except BaseException as e:
                    err = e
                finally:
                    self._lock.acquire()
                    self._planning = False
                    self._finish_pending(st, p, err)
                if err is not None:
                    raise err

    def _finish_pending(self, st: _Model, p: _Pending, err: BaseException | None) -> None:
        p.done = True
        p.error = err
        if st.pending is p:
            st.pending = None
        self._cond.notify_all()

    def _leave(self, entry: _Entry, st: _Model, cold: bool | None) -> None:
        """Check a request out of ``entry``; release the entry if it was its last user."""
        with self._lock:
            entry.inflight -= 1
            if cold is None:
                self._counts["failures"] += 1
            else:
                self._counts["misses" if cold else "hits"] += 1
                if not cold:
                    st.hits += 1
                st.served += 1
                st.acc_sum += entry.cand.accuracy
            release = entry.retired and entry.inflight == 0 and not entry.releasing
            if release:
                entry.releasing = True
            if self._audit is not None:
                self._audit(self._charged, self._budget)
        if release:
            self._release(entry)

    # -- planner -------------------------------------------------------------------------------

    def _acquire_planner(self, st: _Model | None = None) -> bool:
        """Become the planner (lock held). With ``st``, give up (False) once it is resident."""
        while self._planning:
            if st is not None and (st.current is not None or self._closed):
                return False
            self._cond.wait()
        if st is not None and (st.current is not None or self._closed):
            return False
        self._planning = True
        return True

    @contextmanager
    def _planner(self, *, closing: bool = False) -> Iterator[None]:
        with self._lock:
            if self._closed and not closing:
                raise AdaptiveError("the VariantCache is closed")
            self._acquire_planner()
            if self._closed and not closing:
                self._planning = False
                self._cond.notify_all()
                raise AdaptiveError("the VariantCache is closed")
        try:
            yield
        finally:
            with self._lock:
                self._planning = False
                self._cond.notify_all()

    def _snapshot(self) -> tuple[list[int], list[int], int]:
        """Lock held: the residency as the decisions see it: resident candidate per model
        (-1: none), resident models in the order they became resident, their bytes (shared
        groups once)."""
        res = [-1] * len(self._names)
        order = []
        for st in self._models.values():
            e = st.current
            if e is not None:
                res[st.index] = st.index_of[e.cand.variant]
                order.append((st.since, st.index))
        order.sort()
        return res, [m for _, m in order], self._bytes_of(res)

    def _lad(self, res: Sequence[int], pinned: _Model | None = None) -> Ladders:
        """The ladders to decide with. Without shared groups the static ones; with them,
        each candidate costs its private bytes plus the groups no *other* resident holds
        (and, for the others, none of the groups ``pinned``, a model being admitted, could
        use: a downgrade that drops them frees nothing, since ``pinned`` needs them back)."""
        if not self._groups:
            return self._ladders
        models = list(self._models.values())
        holders: dict[str, int] = {}
        for st in models:
            if res[st.index] >= 0:
                for g in st.needs[res[st.index]]:
                    holders[g] = holders.get(g, 0) + 1
        keep = frozenset().union(*pinned.needs) if pinned is not None else frozenset()
        groups = self._groups
        demands = []
        for st in models:
            own = st.needs[res[st.index]] if res[st.index] >= 0 else frozenset()
            held = {g for g, n in holders.items() if n - (g in own) > 0}
            if st is not pinned:
                held |= keep
            cands = [c if not need else Candidate(
                c.variant, st.private[k] + sum(groups[g] for g in need - held), c.accuracy,
                c.latency_s, c.load_s) for k, (c, need) in enumerate(zip(st.cands, st.needs))]
            demands.append(st.demand(0.0, cands))
        return Ladders(demands)

    def _bytes_of(self, choice: Sequence[int]) -> int:
        """What a residency (candidate per model, -1: none) holds, each group once."""
        total, used = 0, set()
        for st in self._models.values():
            k = choice[st.index]
            if k >= 0:
                total += st.private[k]
                used |= st.needs[k]
        return total + sum(self._groups[g] for g in used)

    def _shared_moves(self, choice: Sequence[int], res: Sequence[int],
                      resident: Sequence[int], limit: int, key: Sequence[float]) -> list[Move]:
        """The moves to the shared plan ``choice``: planned residents go to their choice and
        (with ``prefetch``) planned others are loaded; residents the plan leaves out stay
        while everything fits, else shrink to their smallest rung, then the coldest leave;
        prefetches that still do not fit are dropped, coldest first."""
        final = list(res)
        for m, k in enumerate(choice):
            if k >= 0 and (res[m] >= 0 or self.prefetch):
                final[m] = k
        out = sorted((m for m in resident if choice[m] < 0), key=key.__getitem__)
        for m in out:
            if self._bytes_of(final) <= limit:
                break
            final[m] = self._ladders.ladder[m][0]
        for m in out:
            if self._bytes_of(final) <= limit:
                break
            final[m] = -1
        fetched = sorted((m for m in range(len(final)) if res[m] < 0 <= final[m]),
                         key=key.__getitem__)
        for m in fetched:
            if self._bytes_of(final) <= limit:
                break
            final[m] = -1
        return [Move(m, k) for m, k in enumerate(final) if k != res[m]]

    def _moves(self, moves: list[Move]) -> list[tuple[_Model, Candidate | None]]:
        models = self._models
        out = []
        for mv in moves:
            st = models[self._names[mv.model]]
            out.append((st, st.cands[mv.variant] if mv.variant >= 0 else None))
        return out

    def _admit(self, st: _Model) -> None:
        """Planner held: load ``st`` at the variant :func:`adaptive.admission.admit` picks,
        making the room it says (downgrades before evictions)."""
        with self._lock:
            if st.current is not None:
                return
            now = self._clock()
            rate = max(self._rates.rate(st.index, now), 1e-12)
            key = list(self._rates.key)
            limit = self._limit
            res, resident, held = self._snapshot()
            lad = self._lad(res, pinned=st)
            target = lad.rung_of(st.index, self._targets[st.index])
        check_feasible([st.demand(rate)], limit, [st.name])  # InfeasibleBudget
        moves, k = admit(lad, st.index, res, resident, limit - held, key, target)
        todo = self._moves(moves)
        todo.append((st, st.cands[k]))
        log.debug("cold load of %r as %r (moves: %s)", st.name, st.cands[k].variant,
                  [(o.name, c.variant if c else None) for o, c in todo[:-1]])
        self._execute(todo, admitted=st)

    def _rebalance(self, force: bool) -> bool:
        with self._lock:
            now = self._clock()
            rates = self._rates.rates(now)
            key = list(self._rates.key)
            limit = self._limit
            res, resident, held = self._snapshot()
            lad = self._lad(res)
            if self._timer is not None:
                self._timer.planned(now, rates)
        shared = None
        if self._groups:
            shared = ([st.demand(0.0, st.shared) for st in self._models.values()], self._groups)
        choice = plan_choice(lad, rates, res, resident, limit, objective=self.objective,
                             shared=shared)
        if choice is None:
            return False
        with self._lock:
            self._targets = choice
        if shared is None:
            moves = apply_targets(lad, [lad.rung_of(m, k) for m, k in enumerate(choice)], res,
                                  resident, limit - held, rates, key, prefetch=self.prefetch)
        else:
            moves = self._shared_moves(choice, res, resident, limit, key)
        if not moves:
            return False
        if not force and held <= limit and not worth_applying(
                lad, res, resident, moves, rates, hysteresis=self.hysteresis,
                objective=self.objective):
            log.debug("re-plan skipped: gains less than the hysteresis %g", self.hysteresis)
            return False
        todo = self._moves(moves)
        log.info("re-plan at budget %d: %s", limit, ", ".join(
            f"{o.name}: {o.cands[res[o.index]].variant if res[o.index] >= 0 else None} -> "
            f"{c.variant if c else None}" for o, c in todo))
        self._execute(todo, admitted=None)
        with self._lock:
            self._counts["rebalances"] += 1
        return True

    def _apply_budget(self, value: int) -> None:
        """Planner held: make ``value`` the budget; on a drop, shed and wait for the drain."""
        with self._lock:
            old = self._budget
            self._limit = value
            if value >= old or self._charged <= value:
                self._budget = value
                self._notify_audit()
            key = list(self._rates.key)
            res, resident, held = self._snapshot()
            lad = self._lad(res)
        log.debug("budget %d -> %d bytes", old, value)
        try:
            if held > value and self._groups:
                # Freeing a shared group takes every holder stepping down together, which
                # one-model-at-a-time shedding cannot see: follow the shared plan first.
                self._rebalance(force=True)
                with self._lock:
                    res, resident, held = self._snapshot()
                    lad = self._lad(res)
            if held > value:
                self._execute(self._moves(shed(lad, res, resident, value - held, key)),
                              admitted=None)
            # Hysteresis damps re-plans on drifting request rates; a budget the operator
            # raised is an event, so upgrades it allows happen now, however small the gain.
            self._rebalance(force=value > old)
        except Exception:  # noqa: BLE001 - shed below anyway: the budget must hold
            log.exception("re-plan after the budget change to %d bytes failed", value)
        with self._lock:
            over = [(st, st.current.cand.memory_bytes) for st in self._models.values()
                    if st.current is not None]
            held = self._snapshot()[2]
        if held > value:  # only if shedding failed: evict the largest until it fits
            for st, _ in sorted(over, key=lambda x: -x[1]):
                with self._lock:
                    held = self._snapshot()[2]
                if held <= value:
                    break
                if self._retire_current(st):
                    with self._lock:
                        self._counts["evictions"] += 1
        with self._lock:
            while self._charged > value:
                self._cond.wait()
            self._budget = value
            self._notify_audit()

    # -- transitions (planner held, lock not held) ----------------------------------------------

    def _execute(self, moves: list[tuple[_Model, Candidate | None]],
                 admitted: _Model | None) -> None:
        """Evictions, then downgrades (make-before-break where they fit beside the old
        variant), then upgrades and loads, hottest first. Errors loading ``admitted`` are
        raised; others are logged and leave that model smaller or not resident."""
        with self._lock:
            rates = self._rates.rates(self._clock())
            cur = {st.name: (st.current.cand if st.current else None) for st, _ in moves}
        evicts, downs, ups = [], [], []
        for st, c in moves:
            old = cur[st.name]
            if c is None:
                evicts.append(st)
            elif old is not None and (c.memory_bytes, c.accuracy) < (old.memory_bytes,
                                                                      old.accuracy):
                downs.append((st, c))
            else:
                ups.append((st, c))
        for st in evicts:
            if self._retire_current(st):
                with self._lock:
                    self._counts["evictions"] += 1
        waiting = []
        for st, c in sorted(downs, key=lambda x: x[1].memory_bytes - cur[x[0].name].memory_bytes):
            if self._reserve(st, c):
                self._swap_in(st, c, "downgrades")
            else:  # break-before-make: requests for it wait for the smaller variant
                self._retire_current(st)
                waiting.append((st, c))
        for st, c in waiting:
            self._load_into(st, c, "downgrades", raise_errors=False)
        ups.sort(key=lambda x: (x[0] is not admitted, -rates[x[0].index], x[0].name))
        # With shared groups what a load needs depends on what the others hold by then
        # (another model's upgrade may bring the group this one needs), so a load that
        # does not fit yet waits for the rest; one pass suffices without groups.
        while ups:
            later = []
            for st, c in ups:
                if self._fits(st, c):
                    self._load_up(st, c, cur[st.name], admitted)
                else:
                    later.append((st, c))
            if len(later) == len(ups):
                break
            ups = later
        for st, c in ups:  # as planned: the reservation says whether it fits after all
            self._load_up(st, c, cur[st.name], admitted)

    def _fits(self, st: _Model, cand: Candidate) -> bool:
        """Whether ``cand`` fits now, counting ``st``'s current variant as gone."""
        with self._lock:
            e = st.current
            need, needs = self._need(st, cand)
            if e is None:
                return self._charged + need <= self._limit
            freed = e.charge + sum(self._groups[g] for g in e.groups
                                   if self._group_all[g] == 1 and g not in needs)
            return self._charged - freed + need <= self._limit

    def _load_up(self, st: _Model, c: Candidate, old: Candidate | None,
                 admitted: _Model | None) -> None:
        """An upgrade (make-before-break when it fits beside the old variant) or a load."""
        kind = "upgrades" if old is not None else (
            "cold_loads" if st is admitted else "prefetches")
        if old is not None and not self._reserve(st, c):
            self._retire_current(st)
            self._load_into(st, c, kind, raise_errors=False)
        elif old is not None:
            self._swap_in(st, c, kind, raise_errors=False)
        else:
            self._load_into(st, c, kind, raise_errors=st is admitted)

    def _need(self, st: _Model, cand: Candidate) -> tuple[int, frozenset[str]]:
        """Lock held: the bytes loading ``cand`` adds now (its private bytes and the groups
        nobody holds) and the groups it needs."""
        k = st.index_of[cand.variant]
        needs = st.needs[k]
        return st.private[k] + sum(self._groups[g] for g in needs
                                   if not self._group_all[g]), needs

    def _freeable(self) -> int:
        """Lock held: bytes that come back once every retired session has drained."""
        return self._draining + sum(b for g, b in self._groups.items()
                                    if self._group_all[g] and not self._group_live[g])

    def _reserve(self, st: _Model, cand: Candidate) -> bool:
        """Charge what loading ``cand`` adds if it fits under the limit. Waits for draining
        sessions only when their bytes would make it fit (a request on a retired session
        delays the planner, never fails)."""
        with self._lock:
            while True:
                need, needs = self._need(st, cand)
                if self._charged + need <= self._limit:
                    break
                freeable = self._freeable()
                if not (freeable > 0 and self._charged - freeable + need <= self._limit):
                    return False
                self._cond.wait()
            self._charged += need
            for g in needs:
                self._group_all[g] += 1
                self._group_live[g] += 1
            self._notify_audit()
            return True

    def _unhold(self, charge: int, groups: frozenset[str], live: bool) -> None:
        """Lock held: give back a session's (or reservation's) private bytes and its hold on
        its groups; a group nobody holds any more is uncharged."""
        self._charged -= charge
        for g in groups:
            self._group_all[g] -= 1
            if live:
                self._group_live[g] -= 1
            if not self._group_all[g]:
                self._charged -= self._groups[g]
        self._notify_audit()
        self._cond.notify_all()

    def _load_into(self, st: _Model, cand: Candidate, kind: str, *, raise_errors: bool) -> None:
        if not self._reserve(st, cand):
            msg = (f"cannot load {cand.variant!r} for {st.name!r}: {cand.memory_bytes} bytes do "
                   f"not fit under the budget of {self._limit} bytes with what is resident")
            if raise_errors:
                raise AdaptiveError(msg)
            log.error("%s; leaving it not resident", msg)  # a planning bug, not the caller's
            return
        self._swap_in(st, cand, kind, raise_errors=raise_errors)

    def _swap_in(self, st: _Model, cand: Candidate, kind: str, *,
                 raise_errors: bool = False) -> None:
        """Load ``cand`` (its bytes already reserved), make it current, retire the old one."""
        k = st.index_of[cand.variant]
        try:
            session = self._open(cand)
        except Exception as e:
            with self._lock:
                self._unhold(st.private[k], st.needs[k], live=True)
            if raise_errors:
                raise
            log.warning("loading %r for %r failed: %s", cand.variant, st.name, e)
            return
        entry = _Entry(st.name, cand, session, st.private[k], st.needs[k])
        with self._lock:
            old = st.current
            if kind in ("cold_loads", "prefetches"):  # newly resident (a swap keeps its place)
                self._since += 1
                st.since = self._since
            st.current = entry
            self._counts[kind] += 1
            release = self._retire(old) if old is not None else None
            self._cond.notify_all()
        if release is not None:
            self._release(release)

    def _open(self, cand: Candidate) -> Any:
        manifest = self._manifests[cand.variant]
        source = None
        if self._keep_host:
            with self._lock:
                source = self._host.get(cand.variant)
                if source is not None:
                    self._host.move_to_end(cand.variant)
            if source is None:
                source = Path(manifest.onnx_path).read_bytes()
                with self._lock:
                    self._keep_in_host(cand.variant, source)
        t0 = time.perf_counter()
        session = self._loader(manifest, self.device, self.backend, source)
        log.debug("loaded %r in %.1f ms", cand.variant, 1e3 * (time.perf_counter() - t0))
        return session

    def _keep_in_host(self, variant: str, data: bytes) -> None:
        """Lock held: add to the host tier, dropping the least recently loaded to stay
        within ``host_budget``."""
        cap = self._host_budget
        if cap is not None and len(data) > cap:
            return
        self._host[variant] = data
        if cap is not None:
            held = sum(len(b) for b in self._host.values())
            while held > cap:
                _, dropped = self._host.popitem(last=False)
                held -= len(dropped)

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
        self._draining += entry.charge
        for g in entry.groups:
            self._group_live[g] -= 1
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
            self._draining -= entry.charge
            self._unhold(entry.charge, entry.groups, live=False)

    def _notify_audit(self) -> None:
        if self._audit is not None:
            self._audit(self._charged, self._budget)

    # -- background thread ------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.rebalance_interval_s
        poll = min(self.budget_poll_s, interval) if interval else self.budget_poll_s
        next_plan = time.monotonic() + interval if interval else math.inf
        while not self._stop.wait(poll):
            try:
                changed = self._source.dynamic and self.refresh_budget()
                if interval and time.monotonic() >= next_plan:
                    if not changed:
                        self.rebalance()
                    next_plan = time.monotonic() + interval
            except Exception:  # noqa: BLE001 - the thread must outlive a bad re-plan
                log.exception("background re-plan failed")


def _batch_size(inputs: Any) -> int | None:
    """The leading dimension of the first input, when it has a shape."""
    if isinstance(inputs, Mapping):
        first = next(iter(inputs.values()), None)
    elif isinstance(inputs, (list, tuple)):
        first = inputs[0] if inputs else None
    else:
        first = inputs
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) == 0:
        return None
    return int(shape[0])


def _checked_groups(candidates: Mapping[str, Sequence[Candidate]],
                    groups: Mapping[str, int]) -> dict[str, int]:
    """``groups`` validated against the groups the candidates name."""
    from adaptive.sharing import check_groups

    try:
        out = check_groups(groups)
    except ValueError as e:
        raise AdaptiveError(str(e)) from None
    for model, cands in candidates.items():
        for c in cands:
            unknown = sorted(frozenset(getattr(c, "groups", ())) - out.keys())
            if unknown:
                raise AdaptiveError(f"model {model!r}: candidate {c.variant!r} needs groups "
                                    f"{unknown} that groups= does not size; known: "
                                    f"{sorted(out) or 'none'}")
    used = {g for cands in candidates.values() for c in cands for g in getattr(c, "groups", ())}
    return {g: b for g, b in out.items() if g in used}
