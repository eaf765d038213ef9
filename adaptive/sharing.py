"""Variant selection when variants and models share memory.

Pure Python, like :mod:`adaptive.select`: no torch, no onnxruntime.

Hosting several models in one process lets what they share be held once: task models
on one frozen backbone, or the variants of one model (an early-exit variant is a prefix
of the full model; see :mod:`variants.shared`). :func:`select_shared` extends
:func:`adaptive.select` to that case. A **group** is a named block of shared memory
(say ``"minilm-backbone"`` -> 87 MB); a :class:`SharedCandidate` lists the groups it
needs and its own *private* bytes. A plan pays for a group once if any chosen candidate
needs it, so its memory is::

    sum(private bytes of the chosen candidates) + sum(bytes of the groups they need)

How it is solved: with few groups (at most ``max_exact_groups`` that some usable
candidate needs), every subset S of those groups is tried: S's bytes come off the
budget, only candidates whose groups lie in S stay, and the plain MCKP on private bytes
is solved exactly by :func:`adaptive.select`. The best of these plans is optimal,
because the optimal plan is feasible for the subset of groups it uses. That is
``2**G`` sub-solves, so with more groups a local search over the set of paid-for groups
(add, drop or swap one group while that improves the objective) is used instead and the
plan says ``exact=False``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from adaptive.select import OBJECTIVES, Candidate, ModelDemand, Plan, select

__all__ = ["MAX_EXACT_GROUPS", "SharedCandidate", "check_groups", "plan_groups", "select_shared",
           "shared_memory"]

#: :func:`select_shared` is exact up to this many relevant groups (2**G MCKP solves).
MAX_EXACT_GROUPS = 10


@dataclass(frozen=True)
class SharedCandidate(Candidate):
    """A candidate whose ``memory_bytes`` are its *private* bytes and which also needs
    the shared memory ``groups`` (names of entries of the ``groups`` mapping passed to
    :func:`select_shared`). A plain :class:`Candidate` is one that needs no group."""

    groups: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.groups, str):  # one name, not its characters
            raise ValueError(f"Candidate {self.variant!r}: groups must be a collection of "
                             f"group names, got the string {self.groups!r}; wrap it in a list")
        groups = frozenset(self.groups)
        if not all(isinstance(g, str) and g for g in groups):
            raise ValueError(f"Candidate {self.variant!r}: group names must be non-empty "
                             f"strings, got {sorted(map(repr, groups))}")
        object.__setattr__(self, "groups", groups)


def _groups_of(c: Candidate | None) -> frozenset[str]:
    return getattr(c, "groups", frozenset()) if c is not None else frozenset()


def plan_groups(plan: Plan) -> frozenset[str]:
    """The shared groups a plan pays for: those any of its chosen candidates needs."""
    return frozenset().union(*(_groups_of(c) for c in plan.details.values()))


def shared_memory(details: Mapping[str, Candidate | None], groups: Mapping[str, int]) -> int:
    """Memory of a set of chosen candidates: private bytes plus each needed group once."""
    used = frozenset().union(*(_groups_of(c) for c in details.values()))
    return sum(c.memory_bytes for c in details.values() if c is not None) + \
        sum(groups[g] for g in used)


def select_shared(demands: Sequence[ModelDemand], groups: Mapping[str, int],
                  budget_bytes: int, *, objective: str = "accuracy",
                  resident: Mapping[str, str | None] | None = None,
                  max_exact_groups: int = MAX_EXACT_GROUPS) -> Plan:
    """Choose at most one resident variant per model within ``budget_bytes``, charging
    each shared group once.

    Same rules, objectives and result type as :func:`adaptive.select` (floors are never
    violated, rate-0 models are never chosen, ``Plan.choice`` names every model), except
    that ``Plan.memory_bytes`` is the private bytes of the chosen candidates plus the
    bytes of every group they need (:func:`plan_groups` lists those groups). Candidates
    may be :class:`SharedCandidate` or plain :class:`Candidate` (no group).

    ``groups`` maps group name -> bytes; a candidate naming an unknown group is a
    ValueError. Exact (``Plan.exact``) when at most ``max_exact_groups`` groups are
    needed by usable candidates; otherwise a local search. Ties between plans of equal
    objective go to fewer residency changes against ``resident``, then to less memory,
    then to a fixed order.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    group_bytes = check_groups(groups)
    demands = list(demands)
    for d in demands:
        if not isinstance(d, ModelDemand):
            raise TypeError(f"demands must be ModelDemand objects, got {d!r}")
        for c in d.candidates:
            unknown = _groups_of(c) - group_bytes.keys()
            if unknown:
                raise ValueError(f"candidate {c.variant!r} of model {d.model!r} needs unknown "
                                 f"groups {sorted(unknown)}; known groups: "
                                 f"{sorted(group_bytes) or 'none'}; add them to `groups`")
    budget = select(demands, budget_bytes, objective=objective, exact=False,
                    resident=resident).budget_bytes  # validates budget, demands and resident
    relevant = sorted(frozenset().union(
        *(_groups_of(c) for d in demands if d.rate > 0 for c in d.eligible())))
    if len(relevant) <= max_exact_groups:
        subsets: Iterable[frozenset[str]] = (
            frozenset(s) for r in range(len(relevant) + 1)
            for s in itertools.combinations(relevant, r))
        best = None
        for s in subsets:
            best = _better(best, _solve_subset(demands, group_bytes, s, budget, objective,
                                               resident), objective, resident)
        assert best is not None  # the empty subset always yields a plan
        return best
    return _local_search(demands, group_bytes, relevant, budget, objective, resident)


def check_groups(groups: Mapping[str, int]) -> dict[str, int]:
    """``groups`` (name -> bytes) as plain ints; ValueError naming a bad name or size."""
    out = {}
    for name, b in groups.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"group names must be non-empty strings, got {name!r}")
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) \
                or int(b) != b or b < 0:
            raise ValueError(f"group {name!r}: bytes must be a non-negative integer, got {b!r}")
        out[name] = int(b)
    return out


def _solve_subset(demands: list[ModelDemand], group_bytes: dict[str, int],
                  subset: frozenset[str], budget: int, objective: str,
                  resident: Mapping[str, str | None] | None) -> Plan | None:
    """The best plan that may use only the groups in ``subset`` (paid up front)."""
    left = budget - sum(group_bytes[g] for g in subset)
    if left < 0:
        return None
    sub = [ModelDemand(d.model, [c for c in d.candidates if _groups_of(c) <= subset],
                       floor=d.floor, rate=d.rate, slo_s=d.slo_s) for d in demands]
    res = None
    if resident is not None:
        kept = {d.model: {c.variant for c in d.candidates} for d in sub}
        res = {m: (v if v in kept.get(m, ()) else None) for m, v in resident.items()}
    plan = select(sub, left, objective=objective, exact=True, resident=res)
    memory = shared_memory(plan.details, group_bytes)  # only the groups actually used
    return Plan(choice=plan.choice, memory_bytes=memory, utility=plan.utility,
                budget_bytes=budget, exact=plan.exact, details=plan.details,
                objective=objective, served_rate=plan.served_rate)


def _rank(plan: Plan, objective: str, resident: Mapping[str, str | None] | None) -> tuple:
    """Larger is better: objective, then fewer swaps, less memory, a fixed order (the
    tie-break levels of :func:`adaptive.select`)."""
    swaps = 0
    if resident is not None:
        swaps = sum(1 for m, v in plan.choice.items() if resident.get(m) != v)
    value = (plan.served_rate, plan.utility) if objective == "misses" else (plan.utility,)
    order = tuple(sorted((m, v or "") for m, v in plan.choice.items()))
    return (*value, -swaps, -plan.memory_bytes, order)


def _better(a: Plan | None, b: Plan | None, objective: str,
            resident: Mapping[str, str | None] | None) -> Plan | None:
    if a is None or b is None:
        best = a or b
    else:
        best = b if _rank(b, objective, resident) > _rank(a, objective, resident) else a
        if not (a.exact and b.exact):  # a sub-solve hit its work limit
            best = _with_exact(best, False)
    return best


def _with_exact(plan: Plan, exact: bool) -> Plan:
    if plan.exact == exact:
        return plan
    return Plan(choice=plan.choice, memory_bytes=plan.memory_bytes, utility=plan.utility,
                budget_bytes=plan.budget_bytes, exact=exact, details=plan.details,
                objective=plan.objective, served_rate=plan.served_rate)


def _local_search(demands, group_bytes, relevant, budget, objective, resident) -> Plan:
    """Hill-climb over the set of paid-for groups: add, drop or swap one group at a time
    while the objective improves. Each move is one MCKP solve."""
    solve = {}

    def plan_of(s: frozenset[str]) -> Plan | None:
        if s not in solve:
            solve[s] = _solve_subset(demands, group_bytes, s, budget, objective, resident)
        return solve[s]

    current = frozenset()
    best = plan_of(current)
    while True:
        moves = [current | {g} for g in relevant if g not in current]
        moves += [current - {g} for g in current]
        moves += [(current - {g}) | {h} for g in current for h in relevant if h not in current]
        improved = False
        for s in moves:
            p = plan_of(s)
            if p is not None and _rank(p, objective, resident) > _rank(best, objective, resident):
                best, current, improved = p, s, True
        if not improved:
            break
        current = plan_groups(best)  # drop groups the best plan does not use
    return _with_exact(best, False)
