"""Run a simulator policy for a real cache: the policy decides on a mirror, the cache follows.

:class:`PolicyDriver` holds a :class:`~adaptive.cachestate.CacheState` (the *mirror*) and a
registered :class:`~adaptive.policy_base.Policy`, and feeds them exactly what the simulator
feeds them: ``on_hit`` / ``on_miss`` per request, ``on_budget`` per budget change, on the
cache's clock. After each call it reports the models whose residency the policy changed, as
:class:`Target`\\ s (what should serve, and what should load beside it), and the real cache
moves its sessions toward them. The decisions are therefore the simulator's, one for one;
what the mirror can only estimate (how long a load takes) the real cache measures, and where
the two disagree the real cache waits for memory rather than exceed its budget.

The mirror charges each candidate as if alone (shared groups included in full), so real
charges, which count a shared group once, never exceed what the policy planned for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adaptive.cachestate import CacheState
from adaptive.errors import AdaptiveError
from adaptive.select import ModelDemand

__all__ = ["PolicyDriver", "Target"]


@dataclass(frozen=True)
class Target:
    """Model ``model`` should serve candidate ``serve`` (-1: nothing resident) and, when
    ``beside >= 0``, load candidate ``beside`` next to it (make-before-break); ``bbm``: the
    policy broke the old variant first (requests wait: stalls)."""

    model: int
    serve: int
    beside: int = -1
    bbm: bool = False


class PolicyDriver:
    """A policy deciding on a mirror of the cache (see the module docstring)."""

    def __init__(self, demands: Sequence[ModelDemand], budget: int, policy: str,
                 options: Mapping[str, Any] | None = None, *, seed: int = 0):
        from adaptive.policies import get_policy

        self.policy = get_policy(policy, **dict(options or {}))
        self.state = CacheState(demands, int(budget))
        self.policy.reset(self.state, seed=seed)
        self.requests = 0

    def _snap(self) -> tuple[list[int], list[int]]:
        s = self.state
        return list(s.res), list(s.pend)

    def _changes(self, before: tuple[list[int], list[int]]) -> list[Target]:
        s = self.state
        res0, pend0 = before
        out = []
        for m in range(s.n):
            if s.res[m] != res0[m] or s.pend[m] != pend0[m]:
                bbm = (res0[m] >= 0 and s.res[m] >= 0 and s.res[m] != res0[m]
                       and s.pend[m] < 0 and pend0[m] != s.res[m])
                out.append(Target(m, s.res[m], s.pend[m], bbm))
        return out

    def settle(self, t: float) -> list[Target]:
        """Complete the mirror's make-before-break loads due by ``t``."""
        before = self._snap()
        self.state.settle(t)
        return self._changes(before)

    def request(self, m: int, t: float) -> tuple[bool, list[Target]]:
        """A request for model ``m`` at ``t``: (whether the mirror held ``m``, the changes).

        Raises :class:`AdaptiveError` when no eligible variant of ``m`` fits even an empty
        mirror (the caller turns that into :class:`~adaptive.errors.InfeasibleBudget`)."""
        s = self.state
        before = self._snap()
        s.settle(t)
        i = self.requests
        self.requests += 1
        if s.res[m] >= 0:
            self.policy.on_hit(i, t, m)
            if s.res[m] < 0:
                raise AdaptiveError(f"policy {self.policy.name!r} evicted the model it was "
                                    f"serving a hit for")
            return True, self._changes(before)
        if s.min_mem[m] > s.budget:
            raise AdaptiveError(f"no eligible variant of {s.names[m]!r} fits the budget")
        v = self.policy.on_miss(i, t, m)
        if v < 0 or s.res[m] != v:
            raise AdaptiveError(f"policy {self.policy.name!r} returned candidate {v} but "
                                f"holds {s.res[m]}")
        return False, self._changes(before)

    def budget(self, t: float, value: int) -> list[Target]:
        """The budget is now ``value``: the policy sheds (or grows) on the mirror."""
        s = self.state
        before = self._snap()
        s.settle(t)
        s.budget = int(value)
        self.policy.on_budget(t, s.budget)
        if s.used > s.budget:
            raise AdaptiveError(f"policy {self.policy.name!r} left {s.used} bytes charged "
                                f"after the budget dropped to {s.budget}")
        return self._changes(before)

    def evict(self, m: int) -> list[Target]:
        """Take ``m`` out of the mirror (its load failed for real)."""
        s = self.state
        before = self._snap()
        if s.res[m] >= 0 and m not in s.succ and m not in s.queued:
            s.evict(m)
        return self._changes(before)
