"""Any registered policy in the real cache: the simulator's decisions, carried out on sessions.

:class:`PolicyRules` feeds the cache's requests and budget changes to a
:class:`~adaptive.driver.PolicyDriver` (the policy deciding on a mirror ``CacheState``) and
moves the real sessions toward what the policy holds:

* a model the policy evicted is retired at once (requests already running finish on it);
* a model the policy loads (a miss) is loaded **on the requesting thread**, so a miss never
  queues behind another model's swap; other requests for it wait on that one load;
* a make-before-break swap loads beside the serving variant on a swap worker
  (``swap_workers``; 0: the requesting thread, after its own result) and switches when done;
* a break-before-make swap retires the old variant first: requests for the model wait for the
  new one (each is a **stall**), and the first of them loads it itself if no worker has begun.

The mirror assumes each load takes its profiled ``load_s``; a real load may take longer, so a
load the policy planned into memory that is still held waits (until ``wait_timeout_s``) for
it rather than exceed the budget. A failed load takes the model out of the mirror too, so the
next request decides again.

On a trace clock (``CacheConfig.trace_clock``, a replay) a real load takes no trace time, so a
make-before-break side load is loaded at once but **installed only when the mirror completes
it** (``load_s`` later on that clock): until then it is *parked*, charged beside the serving
variant as the mirror charges it, and a policy that abandons it meanwhile only releases it,
as the simulator only cancels it (switching early, the real cache served a variant the
simulator did not, and abandoning it then cost a downgrade the simulator never made).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from adaptive.admission import Rates
from adaptive.driver import PolicyDriver, Target
from adaptive.errors import AdaptiveError
from adaptive.select import Candidate, check_feasible, is_downgrade
from adaptive.sessions import Entry, fresh

if TYPE_CHECKING:
    from adaptive.cache import VariantCache, _Model

log = logging.getLogger(__name__)


class _Job:
    """A load of ``cand`` for ``st`` the policy asked for; ``state``: queued, running, done
    (``parked`` when done on a trace clock before the mirror completed it)."""

    __slots__ = ("st", "cand", "mbb", "kind", "state", "discard", "error", "started", "then",
                 "parked")

    def __init__(self, st: _Model, cand: Candidate, mbb: bool, kind: str):
        self.st = st
        self.cand = cand
        self.mbb = mbb
        self.kind = kind
        self.state = "queued"
        self.discard = False
        self.error: BaseException | None = None
        self.started: tuple[float, float] | None = None
        self.then: Candidate | None = None  # a variant to load beside it once it is in
        #: (session, hold, wall clock at the end of its load): loaded, waiting for the mirror
        self.parked: tuple[Any, Any, float] | None = None


class PolicyRules:
    """The cache's decisions and transitions under any registered online policy."""

    def __init__(self, cache: VariantCache):
        c = self.c = cache
        cfg = cache.config
        demands = [st.demand(0.0, slo_s=cfg.slos.get(st.name)) for st in c._models.values()]
        self.demands = demands
        with c._lock:
            limit = c.plan_limit()
        self.driver = PolicyDriver(demands, limit, cfg.policy, cfg.policy_options)
        self.rates = Rates(len(c._names), float(cfg.ewma_halflife_s) / math.log(2.0))
        self.queue: deque[_Job] = deque()
        self.workers: list[threading.Thread] = []
        self.stopping = False
        self.releases: list[Entry] = []  # retired under the lock, to release outside it
        self.created: list[_Job] | None = None  # jobs a budget change starts (it waits)

    # -- the cache's interface -----------------------------------------------------------------

    def rate(self, st: _Model, now: float) -> float:
        return self.rates.rate(st.index, now)

    def enter(self, st: _Model) -> tuple[Entry, str]:
        c = self.c
        with c._lock:
            c._count_request(st)
            now = c._clock()
            self.rates.seen(st.index, now)
            try:
                _, changes = self.driver.request(st.index, now)
            except AdaptiveError:
                check_feasible([self.demands[st.index]], c.plan_limit(), [st.name])
                raise
            self._follow(changes, requester=st)
            entry = st.current
            if entry is not None:
                entry.inflight += 1
                kind, queued = c._hit(st, now)
            stalled = st.stalling
        self._flush()
        if entry is not None:
            return entry, kind, queued
        return self._await(st), "stalls" if stalled else "misses", 0.0

    def make_room(self) -> list[Entry]:
        """Lock held, a load does not fit: break the variants the policy already counts as
        replaced (a make-before-break swap the mirror completed on its estimate while the
        real one waits in the queue), so the real cache holds no more than the mirror. The
        entries the caller must release are returned."""
        out: list[Entry] = []
        state = self.driver.state
        for st in self.c._models.values():
            job = st.job
            if (job is not None and job.mbb and job.state == "queued" and not job.discard
                    and st.current is not None
                    and state.res[st.index] == st.index_of[job.cand.variant]):
                job.mbb = False
                self._retire(st, stall=True)
        out, self.releases = self.releases, []
        return out

    def after_request(self) -> None:
        self._flush()
        if not self.c.config.swap_workers:
            self._drain()

    def rebalance(self, force: bool) -> bool:
        c = self.c
        with c._lock:
            changes = self.driver.settle(c._clock())
            self._follow(changes, requester=None)
        self.after_request()
        return bool(changes)

    def evict(self, st: _Model) -> bool:
        c = self.c
        with c._lock:
            held = st.current is not None or st.job is not None
            self._follow(self.driver.evict(st.index), requester=None)
        self._flush()
        return held

    def apply_budget(self, value: int) -> None:
        c = self.c
        with c._lock:
            c._limit_to(value)
            changes = self.driver.budget(c._clock(), c.plan_limit())
            self.created = []
            try:
                self._follow(changes, requester=None)
            finally:
                created, self.created = self.created, None
        self.after_request()
        self._finish(created)
        c._enforce(value)

    def close(self) -> None:
        c = self.c
        with c._lock:
            self.stopping = True
            for job in self.queue:
                job.discard = True
                if job.st.job is job:
                    job.st.job = None
            self.queue.clear()
            for st in c._models.values():
                if st.job is not None and st.job.parked is not None:
                    self._drop(st.job)
            c._cond.notify_all()
            workers = list(self.workers)
        self._flush()
        for w in workers:
            if w is not threading.current_thread():
                w.join(timeout=c.config.wait_timeout_s)

    # -- following the policy (lock held) ------------------------------------------------------

    def _follow(self, changes: list[Target], requester: _Model | None) -> None:
        c = self.c
        for tg in changes:
            self._follow_one(c._models[c._names[tg.model]], tg, requester)

    def _retire(self, st: _Model, *, stall: bool) -> None:
        c = self.c
        old = st.current
        if old is None:
            return
        release = c._retire(old)
        if release is not None:
            self.releases.append(release)
        st.stalling = stall

    def _follow_one(self, st: _Model, tg: Target, requester: _Model | None) -> None:
        c = self.c
        serve = st.cands[tg.serve] if tg.serve >= 0 else None
        beside = st.cands[tg.beside] if tg.beside >= 0 else None
        job = st.job
        if job is not None and job.parked is not None and job.cand is serve:
            self._unpark(st, job, stall=tg.bbm)  # the mirror completed it (or broke the old)
            job = None
        cur = st.current.cand if st.current is not None else None
        if serve is None:  # evicted
            if job is not None:
                self._drop(job)
            if st.current is not None:
                self._retire(st, stall=False)
                c._counts["evictions"] += 1
            st.stalling = False
            return
        if beside is not None:  # make-before-break under way beside what serves
            if cur is not serve:  # the real cache must get to ``serve`` first
                if job is not None and job.cand is serve:  # under way (a swap the mirror
                    if tg.bbm and st.current is not None:  # completed on its estimate)
                        self._retire(st, stall=True)
                else:  # nothing serves it yet, or what serves is no longer charged
                    if job is not None:
                        self._drop(job)
                    self._retire(st, stall=True)
                    job = self._start(st, serve, mbb=False, old=cur, requester=requester)
                job.then = beside
                return
            if job is not None and job.cand is beside:
                return
            if job is not None:
                self._drop(job)
            self._start(st, beside, mbb=True, old=cur, requester=None)
            return
        if cur is serve:  # as wanted (a make-before-break the policy gave up, if any)
            if job is not None:
                self._drop(job)
            return
        if job is not None and job.cand is serve and job.then is not None:
            job.then = None  # the policy gave up the side load planned after it
        if job is not None and job.cand is serve:  # loading it already
            if tg.bbm and st.current is not None:
                self._retire(st, stall=True)
            return
        if job is not None:
            self._drop(job)
        if st.current is not None:  # break-before-make: the policy no longer charges it
            self._retire(st, stall=True)
        self._start(st, serve, mbb=False, old=cur, requester=requester)

    def _start(self, st: _Model, cand: Candidate, *, mbb: bool, old: Candidate | None,
               requester: _Model | None) -> _Job:
        if old is not None:
            kind = "downgrades" if is_downgrade(cand, old) else "upgrades"
        else:
            kind = "cold_loads" if st is requester else "prefetches"
        job = st.job = _Job(st, cand, mbb, kind)
        if self.created is not None:
            self.created.append(job)
        if st is not requester:  # the requester loads its own model itself
            self.queue.append(job)
            self._spawn()
            self.c._cond.notify_all()
        return job

    def _drop(self, job: _Job) -> None:
        job.discard = True
        if job.st.job is job:
            job.st.job = None
        if job.parked is not None:  # loaded beside, never installed: its bytes come back
            session, hold, _ = job.parked
            job.parked = None
            self.releases.append(self._unused(job.st, job.cand, session, hold))

    def _unused(self, st: _Model, cand: Candidate, session: Any, hold: Any) -> Entry:
        """Lock held: a loaded session that will not be installed, retired from the ledger,
        as an entry for the caller to release outside the lock."""
        entry = Entry(st.name, cand, session, hold)
        self.c._ledger.retire(hold)
        entry.retired = entry.releasing = True
        return entry

    def _parks(self, job: _Job) -> bool:
        """Lock held: whether ``job``, just loaded, waits for the mirror before it installs: a
        make-before-break side load on a trace clock that the mirror has not completed yet."""
        st = job.st
        return (self.c.config.trace_clock and job.mbb and st.current is not None
                and self.driver.state.pend[st.index] == st.index_of[job.cand.variant])

    def _unpark(self, st: _Model, job: _Job, *, stall: bool) -> None:
        """Lock held: install ``job``'s parked session. With ``stall`` the policy broke the
        serving variant first: requests that arrive, on the clock, before the load ended
        would have waited for it (the load's start there plus the wall time it took)."""
        session, hold, ended = job.parked
        job.parked = None
        st.job = None
        if stall:
            self._retire(st, stall=True)
        release = self.c._install(st, job.cand, session, hold, job.kind, job.started, ended)
        if release is not None:
            self.releases.append(release)

    def _spawn(self) -> None:
        c = self.c
        want = c.config.swap_workers
        if len(self.workers) >= want or self.stopping:
            return
        t = threading.Thread(target=self._work, name=f"memadapt-swap-{len(self.workers)}",
                             daemon=True)
        self.workers.append(t)
        t.start()

    # -- carrying loads out (lock not held) ----------------------------------------------------

    def _flush(self) -> None:
        with self.c._lock:
            releases, self.releases = self.releases, []
        for e in releases:
            self.c._release(e)

    def _claim(self) -> _Job | None:
        """Lock held: the next queued job, marked running (None: nothing queued)."""
        while self.queue:
            job = self.queue.popleft()
            if job.state == "queued" and not job.discard:
                job.state = "running"
                return job
        return None

    def _drain(self) -> None:
        """Run the queued jobs on this thread (``swap_workers=0``)."""
        while True:
            with self.c._lock:
                job = self._claim()
            if job is None:
                return
            self._run(job)

    def _work(self) -> None:
        c = self.c
        while True:
            with c._lock:
                job = self._claim()
                while job is None:
                    if self.stopping or c._closed:
                        return
                    c._cond.wait()
                    job = self._claim()
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - a worker outlives a bad load
                log.exception("swap worker: loading %r failed", job.cand.variant)

    def _finish(self, jobs: list[_Job]) -> None:
        """Wait for ``jobs`` (running those nobody has begun here): a budget change returns
        once the swaps it caused are made."""
        c = self.c
        deadline = c._deadline()
        for job in jobs:
            with c._lock:
                mine = job.state == "queued" and not job.discard
                if mine:
                    job.state = "running"
            if mine:
                self._run(job)
                continue
            with c._lock:
                while job.state != "done" and not job.discard:
                    c._wait(deadline, f"budget change waiting for {job.cand.variant!r} to "
                                      f"load for {job.st.name!r}")

    def _await(self, st: _Model) -> Entry:
        """Wait for ``st``'s load (running it here if nobody has begun it); check a request
        into the entry it produces."""
        c = self.c
        deadline = c._deadline()
        waited: _Job | None = None
        with c._lock:
            while True:
                if c._closed:
                    raise AdaptiveError("the VariantCache is closed")
                e = st.current
                if e is not None:
                    e.inflight += 1
                    return e
                if waited is not None and waited.state == "done" and waited.error is not None:
                    raise fresh(waited.error)
                job = st.job
                if job is None:
                    v = self.driver.state.res[st.index]
                    if v < 0:  # another decision evicted it meanwhile: decide again
                        _, changes = self.driver.request(st.index, c._clock())
                        self._follow(changes, requester=st)
                        continue
                    job = self._start(st, st.cands[v], mbb=False, old=None, requester=st)
                waited = job
                if job.parked is not None:  # nothing serves it any more: the load is in
                    self._unpark(st, job, stall=False)
                    continue
                if job.state == "queued":
                    job.state = "running"  # ours to make (or claimed from the queue)
                    c._lock.release()
                    try:
                        self._flush()
                        self._run(job)
                    finally:
                        c._lock.acquire()
                    continue
                c._wait(deadline, f"request for {st.name!r} waiting for {job.cand.variant!r} "
                                  f"to load")

    def _run(self, job: _Job) -> None:
        """Reserve, load and install ``job`` (state running); errors are kept on the job."""
        c = self.c
        st, cand = job.st, job.cand
        job.started = c.started()
        try:
            hold = c._reserve(st, cand, abandoned=lambda: job.discard)
            if hold is None and job.discard:  # the policy gave it up meanwhile: no error
                with c._lock:
                    job.state = "done"
                    c._cond.notify_all()
                return
            if hold is None:
                raise AdaptiveError(f"cannot load {cand.variant!r} for {st.name!r}: it does not "
                                    f"fit under the budget of {c._ledger.limit} bytes with what "
                                    f"is charged, and nothing is draining")
        except Exception as e:  # noqa: BLE001 - kept for the requests waiting on it
            self._fail(job, e)
            return
        session = None
        try:
            if not job.discard:
                session = c._open(cand)
        except Exception as e:  # noqa: BLE001
            with c._lock:
                c._unreserve(hold)
            self._fail(job, e)
            return
        release = None
        with c._lock:
            c._loaded(st, cand, hold)
            job.state = "done"
            if session is None:  # dropped while it waited for memory
                c._unreserve(hold, loading=False)
            elif job.discard or st.job is not job or c._closed:
                release = self._unused(st, cand, session, hold)
            elif self._parks(job):
                job.parked = (session, hold, time.perf_counter())
            else:
                st.job = None
                release = c._install(st, cand, session, hold, job.kind, job.started)
                then = job.then
                if then is not None and self.driver.state.pend[st.index] == \
                        st.index_of[then.variant]:
                    self._start(st, then, mbb=True, old=cand, requester=None)
            c._cond.notify_all()
        if release is not None:
            c._release(release)

    def _fail(self, job: _Job, e: BaseException) -> None:
        c = self.c
        log.warning("loading %r for %r failed: %s", job.cand.variant, job.st.name, e)
        with c._lock:
            job.state = "done"
            job.error = e
            st = job.st
            if st.job is job:
                st.job = None
                if not job.mbb and st.current is None:  # the policy decides afresh next time
                    self._follow(self.driver.evict(st.index), requester=None)
            c._cond.notify_all()
        self._flush()
