"""The policy protocol of the trace simulator and the registry of policies.

A policy decides *what* is resident; :class:`~adaptive.cachestate.CacheState` is the only thing
that moves bytes. The simulator drives a policy with three calls:

* ``on_hit(i, t, m)``: request ``i`` at time ``t`` for model ``m``, which is resident (perhaps
  still loading). The policy updates its bookkeeping; it may swap ``m`` or others but must not
  evict ``m``.
* ``on_miss(i, t, m) -> v``: ``m`` is not resident; the policy makes room and loads a variant
  ``v`` of ``m`` that is eligible, and returns it. The simulator has already checked that
  some eligible variant fits an empty cache (otherwise the request is rejected).
* ``on_budget(t, budget)``: the budget changed (``cache.budget`` is already the new value);
  the policy must shed memory until ``cache.used <= budget`` before returning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

from adaptive.cachestate import CacheState
from adaptive.errors import AdaptiveError
from variants.registry import Registry

__all__ = ["Policy", "PolicyError", "get_policy", "list_policies", "policy_class",
           "register_policy"]


class PolicyError(AdaptiveError, ValueError):
    """A policy name or option is not valid."""


class Policy:
    """Base class: see the module docstring for the protocol."""

    name: ClassVar[str] = ""
    #: offline policies are given the whole future trace in :meth:`reset`
    offline: ClassVar[bool] = False
    #: whether the policy chooses among variants (not just the base) -- for reports
    variant_aware: ClassVar[bool] = False
    #: an ablation of memadapt (one of its parts removed or moved to a baseline), not a
    #: baseline a user would pick: reports show it but do not count it as a competitor
    ablation: ClassVar[bool] = False

    cache: CacheState

    def reset(self, cache: CacheState, *, seed: int = 0, future: np.ndarray | None = None) -> None:
        """Start a run. ``future[i]`` is request ``i``'s model index (offline policies only)."""
        self.cache = cache

    def on_hit(self, i: int, t: float, m: int) -> None:
        """Request ``i`` for resident model ``m``."""

    def on_miss(self, i: int, t: float, m: int) -> int:
        """Load some eligible variant of non-resident ``m`` and return its candidate index."""
        raise NotImplementedError

    def on_budget(self, t: float, budget: int) -> None:
        """Shed memory until ``cache.used <= budget``."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Policy-specific counters for the result (e.g. re-plans)."""
        return {}


P = TypeVar("P", bound=type[Policy])
_POLICIES: Registry[type[Policy]] = Registry("policy", error=PolicyError)


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator: make a :class:`Policy` subclass available to :func:`get_policy`
    (another class under a registered name is refused)."""

    def deco(cls: P) -> P:
        _POLICIES.register(name, cls)
        cls.name = name
        return cls

    return deco


def list_policies() -> list[str]:
    """Names accepted by :func:`get_policy` (import :mod:`adaptive.policies` to have them all)."""
    return _POLICIES.names()


def policy_class(name: str) -> type[Policy]:
    """The registered class (its ``offline``/``variant_aware``/``ablation`` flags)."""
    return _POLICIES.get(name)


def get_policy(name: str, **kw: Any) -> Policy:
    """A fresh policy instance; ``kw`` are the policy's options."""
    cls = _POLICIES.get(name)
    try:
        return cls(**kw)
    except TypeError as e:
        raise PolicyError(f"policy {name!r}: {e}") from None
