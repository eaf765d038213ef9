"""``memadapt-v1`` in the real cache: :mod:`adaptive.admission`'s re-planning rules, natively.

The one policy that plans with shared groups (:func:`adaptive.sharing.select_shared` charges
each group once) and re-plans from request rates (``rebalance()``, the background interval,
or a :class:`~adaptive.admission.ReplanSchedule` in clock time). A miss downgrades the
cheapest residents before it evicts the coldest, a budget drop likewise; upgrades come from
re-plans. Transitions are made by one *planner* at a time (a flag under the cache's lock), so
a miss waits for a re-plan in progress: this is the rule set the simulator's ``memadapt-v1``
measures, kept for replays and for shared-group plans; other policies run through
:mod:`adaptive.cache_policy`.

The decisions see, per model, what each of its candidates would add to what the *other*
residents hold: exact for one model's swap, and never optimistic when several move at once (a
group two of them drop is not counted as freed, and the groups a model being admitted could
use are kept).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from adaptive.admission import (
    Ladders,
    Move,
    Rates,
    admit,
    apply_targets,
    plan_choice,
    shed,
    worth_applying,
)
from adaptive.errors import AdaptiveError
from adaptive.select import Candidate, check_feasible, is_downgrade
from adaptive.sessions import Entry, fresh

if TYPE_CHECKING:
    from adaptive.cache import VariantCache, _Model

log = logging.getLogger(__name__)

_LN2 = math.log(2.0)


class _Pending:
    """A load some request asked for; other requests for the model wait on it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None


class ReplanRules:
    """The cache's decisions and transitions under ``policy="memadapt-v1"``."""

    def __init__(self, cache: VariantCache):
        c = self.c = cache
        cfg = cache.config
        self.ladders = Ladders([st.demand(0.0, slo_s=cfg.slos.get(st.name))
                                for st in c._models.values()])
        self.rates = Rates(len(c._names), float(cfg.ewma_halflife_s) / _LN2)
        self.targets = [-1] * len(c._names)  # candidate per model from the last re-plan
        self.timer = cfg.schedule.timer() if cfg.schedule is not None else None
        self.planning = False

    # -- the cache's interface -----------------------------------------------------------------

    def rate(self, st: _Model, now: float) -> float:
        return self.rates.rate(st.index, now)

    def enter(self, st: _Model) -> tuple[Entry, str, float]:
        c = self.c
        with c._lock:
            c._count_request(st)
            now = c._clock()
            self.rates.seen(st.index, now)
            timer = self.timer
            due = timer is not None and timer.due(now) and \
                timer.check(now, lambda: self.rates.rates(now)) is not None
            entry = None if due else st.current
            if entry is not None:
                entry.inflight += 1
        if due:  # the schedule's re-plan comes before this request is served, as simulated
            try:
                self.rebalance(False)
            except Exception:  # noqa: BLE001 - a failed re-plan must not fail the request
                log.exception("scheduled re-plan failed")
            with c._lock:
                entry = st.current
                if entry is not None:
                    entry.inflight += 1
        if entry is not None:
            with c._lock:
                kind, queued = c._hit(st, now)
            return entry, kind, queued
        return self._acquire_cold(st), "misses", 0.0

    def after_request(self) -> None:
        pass

    def make_room(self) -> list[Entry]:
        return []

    def rebalance(self, force: bool) -> bool:
        with self._planner():
            return self._rebalance(force)

    def evict(self, st: _Model) -> bool:
        c = self.c
        with self._planner():
            if not c._retire_current(st):
                return False
            with c._lock:
                c._counts["evictions"] += 1
            return True

    def apply_budget(self, value: int) -> None:
        with self._planner():
            self._apply_budget(value)

    def close(self) -> None:
        with self._planner(closing=True):
            pass

    # -- requests ------------------------------------------------------------------------------

    def _acquire_cold(self, st: _Model) -> Entry:
        """Wait for (or make) a load of ``st``; return its entry with a request checked in."""
        c = self.c
        deadline = c._deadline()
        with c._lock:
            while True:
                if c._closed:
                    raise AdaptiveError("the VariantCache is closed")
                entry = st.current
                if entry is not None:
                    entry.inflight += 1
                    return entry
                p = st.pending
                if p is not None:  # someone else's load: wait for it or for residency
                    while st.current is None and not p.done and not c._closed:
                        c._wait(deadline, f"request for {st.name!r} waiting for its load")
                    if st.current is None and p.done and p.error is not None:
                        raise fresh(p.error)
                    continue
                p = st.pending = _Pending()
                if not self._acquire_planner(st, deadline):  # became resident meanwhile
                    self._finish_pending(st, p, None)
                    continue
                c._lock.release()
                err: BaseException | None = None
                try:
                    self._admit(st)
                except BaseException as e:
                    err = e
                finally:
                    c._lock.acquire()
                    self.planning = False
                    self._finish_pending(st, p, err)
                if err is not None:
                    raise err

    def _finish_pending(self, st: _Model, p: _Pending, err: BaseException | None) -> None:
        p.done = True
        p.error = err
        if st.pending is p:
            st.pending = None
        self.c._cond.notify_all()

    # -- planner -------------------------------------------------------------------------------

    def _acquire_planner(self, st: _Model | None = None, deadline: float | None = None) -> bool:
        """Become the planner (lock held). With ``st``, give up (False) once it is resident."""
        c = self.c
        deadline = c._deadline() if deadline is None else deadline
        while self.planning:
            if st is not None and (st.current is not None or c._closed):
                return False
            c._wait(deadline, "waiting for the re-plan in progress"
                              + (f" to load {st.name!r}" if st is not None else ""))
        if st is not None and (st.current is not None or c._closed):
            return False
        self.planning = True
        return True

    @contextmanager
    def _planner(self, *, closing: bool = False) -> Iterator[None]:
        c = self.c
        with c._lock:
            if c._closed and not closing:
                raise AdaptiveError("the VariantCache is closed")
            self._acquire_planner()
            if c._closed and not closing:
                self.planning = False
                c._cond.notify_all()
                raise AdaptiveError("the VariantCache is closed")
        try:
            yield
        finally:
            with c._lock:
                self.planning = False
                c._cond.notify_all()

    def _snapshot(self) -> tuple[list[int], list[int], int]:
        """Lock held: the residency as the decisions see it: resident candidate per model
        (-1: none), resident models in the order they became resident, their bytes (shared
        groups once)."""
        c = self.c
        res = [-1] * len(c._names)
        order = []
        for st in c._models.values():
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
        c = self.c
        if not c._groups:
            return self.ladders
        models = list(c._models.values())
        holders: dict[str, int] = {}
        for st in models:
            if res[st.index] >= 0:
                for g in st.needs[res[st.index]]:
                    holders[g] = holders.get(g, 0) + 1
        keep = frozenset().union(*pinned.needs) if pinned is not None else frozenset()
        groups = c._groups
        demands = []
        for st in models:
            own = st.needs[res[st.index]] if res[st.index] >= 0 else frozenset()
            held = {g for g, n in holders.items() if n - (g in own) > 0}
            if st is not pinned:
                held |= keep
            cands = [cd if not need else Candidate(
                cd.variant, st.private[k] + sum(groups[g] for g in need - held), cd.accuracy,
                cd.latency_s, cd.load_s) for k, (cd, need) in enumerate(zip(st.cands, st.needs))]
            demands.append(st.demand(0.0, cands))
        return Ladders(demands)

    def _bytes_of(self, choice: Sequence[int]) -> int:
        """What a residency (candidate per model, -1: none) holds, each group once."""
        c = self.c
        total, used = 0, set()
        for st in c._models.values():
            k = choice[st.index]
            if k >= 0:
                total += st.private[k]
                used |= st.needs[k]
        return total + sum(c._groups[g] for g in used)

    def _shared_moves(self, choice: Sequence[int], res: Sequence[int],
                      resident: Sequence[int], limit: int, key: Sequence[float]) -> list[Move]:
        """The moves to the shared plan ``choice``: planned residents go to their choice and
        (with ``prefetch``) planned others are loaded; residents the plan leaves out stay
        while everything fits, else shrink to their smallest rung, then the coldest leave;
        prefetches that still do not fit are dropped, coldest first."""
        final = list(res)
        for m, k in enumerate(choice):
            if k >= 0 and (res[m] >= 0 or self.c.config.prefetch):
                final[m] = k
        out = sorted((m for m in resident if choice[m] < 0), key=key.__getitem__)
        for m in out:
            if self._bytes_of(final) <= limit:
                break
            final[m] = self.ladders.ladder[m][0]
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
        c = self.c
        out = []
        for mv in moves:
            st = c._models[c._names[mv.model]]
            out.append((st, st.cands[mv.variant] if mv.variant >= 0 else None))
        return out

    def _admit(self, st: _Model) -> None:
        """Planner held: load ``st`` at the variant :func:`adaptive.admission.admit` picks,
        making the room it says (downgrades before evictions)."""
        c = self.c
        with c._lock:
            if st.current is not None:
                return
            now = c._clock()
            rate = max(self.rates.rate(st.index, now), 1e-12)
            key = list(self.rates.key)
            limit = c.plan_limit()
            res, resident, held = self._snapshot()
            lad = self._lad(res, pinned=st)
            target = lad.rung_of(st.index, self.targets[st.index])
        check_feasible([st.demand(rate)], limit, [st.name])  # InfeasibleBudget
        moves, k = admit(lad, st.index, res, resident, limit - held, key, target)
        todo = self._moves(moves)
        todo.append((st, st.cands[k]))
        log.debug("cold load of %r as %r (moves: %s)", st.name, st.cands[k].variant,
                  [(o.name, cd.variant if cd else None) for o, cd in todo[:-1]])
        self._execute(todo, admitted=st)

    def _rebalance(self, force: bool) -> bool:
        c = self.c
        with c._lock:
            now = c._clock()
            rates = self.rates.rates(now)
            key = list(self.rates.key)
            limit = c.plan_limit()
            res, resident, held = self._snapshot()
            lad = self._lad(res)
            if self.timer is not None:
                self.timer.planned(now, rates)
        shared = None
        if c._groups:
            shared = ([st.demand(0.0, st.shared) for st in c._models.values()], c._groups)
        cfg = c.config
        choice = plan_choice(lad, rates, res, resident, limit, objective=cfg.objective,
                             shared=shared)
        if choice is None:
            return False
        with c._lock:
            self.targets = choice
        if shared is None:
            moves = apply_targets(lad, [lad.rung_of(m, k) for m, k in enumerate(choice)], res,
                                  resident, limit - held, rates, key, prefetch=cfg.prefetch)
        else:
            moves = self._shared_moves(choice, res, resident, limit, key)
        if not moves:
            return False
        if not force and held <= limit and not worth_applying(
                lad, res, resident, moves, rates, hysteresis=cfg.hysteresis,
                objective=cfg.objective):
            log.debug("re-plan skipped: gains less than the hysteresis %g", cfg.hysteresis)
            return False
        todo = self._moves(moves)
        log.info("re-plan at budget %d: %s", limit, ", ".join(
            f"{o.name}: {o.cands[res[o.index]].variant if res[o.index] >= 0 else None} -> "
            f"{cd.variant if cd else None}" for o, cd in todo))
        self._execute(todo, admitted=None)
        with c._lock:
            c._counts["rebalances"] += 1
        return True

    def _apply_budget(self, value: int) -> None:
        """Planner held: make ``value`` the budget; on a drop, shed and wait for the drain."""
        c = self.c
        with c._lock:
            old = c._limit_to(value)
            key = list(self.rates.key)
            limit = c.plan_limit()
            res, resident, held = self._snapshot()
            lad = self._lad(res)
        log.debug("budget %d -> %d bytes", old, value)
        try:
            if held > limit and c._groups:
                # Freeing a shared group takes every holder stepping down together, which
                # one-model-at-a-time shedding cannot see: follow the shared plan first.
                self._rebalance(force=True)
                with c._lock:
                    res, resident, held = self._snapshot()
                    lad = self._lad(res)
            if held > limit:
                self._execute(self._moves(shed(lad, res, resident, limit - held, key)),
                              admitted=None)
            # Hysteresis damps re-plans on drifting request rates; a budget the operator
            # raised is an event, so upgrades it allows happen now, however small the gain.
            self._rebalance(force=value > old)
        except Exception:  # noqa: BLE001 - shed below anyway: the budget must hold
            log.exception("re-plan after the budget change to %d bytes failed", value)
        with c._lock:
            over = [(st, st.current.cand.memory_bytes) for st in c._models.values()
                    if st.current is not None]
            held = self._snapshot()[2]
        if held > value:  # only if shedding failed: evict the largest until it fits
            for st, _ in sorted(over, key=lambda x: -x[1]):
                with c._lock:
                    held = self._snapshot()[2]
                if held <= value:
                    break
                if c._retire_current(st):
                    with c._lock:
                        c._counts["evictions"] += 1
        c._enforce(value)

    # -- transitions (planner held, lock not held) ----------------------------------------------

    def _execute(self, moves: list[tuple[_Model, Candidate | None]],
                 admitted: _Model | None) -> None:
        """Evictions, then downgrades (make-before-break where they fit beside the old
        variant), then upgrades and loads, hottest first. Errors loading ``admitted`` are
        raised; others are logged and leave that model smaller or not resident."""
        c = self.c
        with c._lock:
            rates = self.rates.rates(c._clock())
            cur = {st.name: (st.current.cand if st.current else None) for st, _ in moves}
        evicts, downs, ups = [], [], []
        for st, cd in moves:
            old = cur[st.name]
            if cd is None:
                evicts.append(st)
            elif old is not None and is_downgrade(cd, old):
                downs.append((st, cd))
            else:
                ups.append((st, cd))
        for st in evicts:
            if c._retire_current(st):
                with c._lock:
                    c._counts["evictions"] += 1
        waiting = []
        for st, cd in sorted(downs,
                             key=lambda x: x[1].memory_bytes - cur[x[0].name].memory_bytes):
            hold = c._reserve(st, cd, wait=False)
            if hold is not None:
                self._swap_in(st, cd, hold, "downgrades")
            else:  # break-before-make: requests for it wait for the smaller variant
                c._retire_current(st)
                waiting.append((st, cd))
        for st, cd in waiting:
            self._load_into(st, cd, "downgrades", raise_errors=False)
        ups.sort(key=lambda x: (x[0] is not admitted, -rates[x[0].index], x[0].name))
        # With shared groups what a load needs depends on what the others hold by then
        # (another model's upgrade may bring the group this one needs), so a load that
        # does not fit yet waits for the rest; one pass suffices without groups.
        while ups:
            later = []
            for st, cd in ups:
                if self._fits(st, cd):
                    self._load_up(st, cd, cur[st.name], admitted)
                else:
                    later.append((st, cd))
            if len(later) == len(ups):
                break
            ups = later
        for st, cd in ups:  # as planned: the reservation says whether it fits after all
            self._load_up(st, cd, cur[st.name], admitted)

    def _fits(self, st: _Model, cand: Candidate) -> bool:
        """Whether ``cand`` fits now, counting ``st``'s current variant as gone."""
        c = self.c
        with c._lock:
            e = st.current
            k = st.index_of[cand.variant]
            needs = st.needs[k]
            private = st.private[k] + (st.excess[k] if c.config.charge_load_peak else 0)
            freed = c._ledger.frees(e.hold, keep=needs) if e is not None else 0
            return c._ledger.fits(private, needs, freed=freed)

    def _load_up(self, st: _Model, cd: Candidate, old: Candidate | None,
                 admitted: _Model | None) -> None:
        """An upgrade (make-before-break when it fits beside the old variant) or a load."""
        c = self.c
        kind = "upgrades" if old is not None else (
            "cold_loads" if st is admitted else "prefetches")
        if old is not None:
            hold = c._reserve(st, cd, wait=False)
            if hold is None:
                c._retire_current(st)
                self._load_into(st, cd, kind, raise_errors=False)
            else:
                self._swap_in(st, cd, hold, kind)
        else:
            self._load_into(st, cd, kind, raise_errors=st is admitted)

    def _load_into(self, st: _Model, cand: Candidate, kind: str, *, raise_errors: bool) -> None:
        c = self.c
        hold = c._reserve(st, cand)
        if hold is None:
            msg = (f"cannot load {cand.variant!r} for {st.name!r}: {cand.memory_bytes} bytes do "
                   f"not fit under the budget of {c._ledger.limit} bytes with what is resident")
            if raise_errors:
                raise AdaptiveError(msg)
            log.error("%s; leaving it not resident", msg)  # a planning bug, not the caller's
            return
        self._swap_in(st, cand, hold, kind, raise_errors=raise_errors)

    def _swap_in(self, st: _Model, cand: Candidate, hold: Any, kind: str, *,
                 raise_errors: bool = False) -> None:
        """Load ``cand`` (its bytes reserved in ``hold``), make it current, retire the old."""
        c = self.c
        started = c.started()
        try:
            session = c._open(cand)
        except Exception as e:
            with c._lock:
                c._unreserve(hold)
            if raise_errors:
                raise
            log.warning("loading %r for %r failed: %s", cand.variant, st.name, e)
            return
        with c._lock:
            c._loaded(st, cand, hold)
            release = c._install(st, cand, session, hold, kind, started)
        if release is not None:
            c._release(release)
