"""Caching policies for the trace simulator: the public face of the policy registry.

Importing this module registers every built-in policy:

* whole-model baselines (:mod:`adaptive.baselines`): ``random``, ``lru``, ``lfu``,
  ``loadtime``, ``cremebrulee``; the variant-aware ``infaas``; the offline ``belady``
  (Belady-Size over smallest eligible variants);
* ``memadapt`` (:mod:`adaptive.memadapt_policy`);
* ablations: ``memadapt-whole``, ``infaas-experts`` and ``memadapt-v1`` (the rules the real
  cache runs today, :mod:`adaptive.memadapt_v1`).

:class:`~adaptive.cachestate.CacheState` is the only thing that moves bytes, so the invariants
-- never above the budget at any instant, one serving variant per model -- hold in one place
whatever a policy does (cachetools' split: policies differ only in what they give up).
"""

from __future__ import annotations

from adaptive import baselines, memadapt_policy, memadapt_v1
from adaptive.baselines import (
    BeladySizePolicy,
    CremeBruleePolicy,
    INFaaSPolicy,
    LFUPolicy,
    LoadTimePolicy,
    LRUPolicy,
    RandomPolicy,
    WholeModelPolicy,
)
from adaptive.cachestate import CacheInvariantError, CacheState
from adaptive.memadapt_policy import MemAdaptPolicy
from adaptive.memadapt_v1 import MemAdaptV1Policy
from adaptive.policy_base import (
    Policy,
    PolicyError,
    get_policy,
    list_policies,
    policy_class,
    register_policy,
)

__all__ = [
    "BeladySizePolicy", "CacheInvariantError", "CacheState", "CremeBruleePolicy",
    "INFaaSPolicy", "LFUPolicy", "LRUPolicy", "LoadTimePolicy", "MemAdaptPolicy",
    "MemAdaptV1Policy", "Policy", "PolicyError", "RandomPolicy", "WholeModelPolicy",
    "competitors", "get_policy", "list_policies", "policy_class", "register_policy",
]

del baselines, memadapt_policy, memadapt_v1  # imported to register their policies


def competitors(names: list[str] | None = None) -> list[str]:
    """The online baselines memadapt must beat: registered, not offline, not an ablation,
    not memadapt itself."""
    out = []
    for name in names if names is not None else list_policies():
        cls = policy_class(name)
        if name != "memadapt" and not cls.offline and not cls.ablation:
            out.append(name)
    return out
