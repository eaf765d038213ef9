"""Early exits: the ``EarlyExit`` transform that makes truncated variants (``exit@k``).

``EarlyExit(at=k)`` makes a *truncated* variant: a module holding only the prefix up to
exit point ``k`` and its head, much smaller than the base. Its backbone is the base's
(or the pruned parent's) prefix, frozen: only the head is trained, by distillation from
the full base model (:mod:`variants.recover`), so its tensors are identical to the
parent's and a cache can share them. Where the exit points are and what the heads look
like is each family's :class:`~variants.exits.ExitAdapter` (ResNet: a pooled Linear;
BERT: copies of the final encoder layers, or the classifier's own top).

The dynamic early-exit runner (every head, stopping per sample once one is confident)
lives in :mod:`variants.dynamic_exit`; its names are re-exported here.
"""

from __future__ import annotations

import logging

from variants.dynamic_exit import DynamicEarlyExit, ExitResult, build_dynamic_exit
from variants.exits import (
    EXIT_KEY,
    ExitAdapter,
    check_exit,
    exit_adapter,
    list_exit_families,
    register_exit_adapter,
)
from variants.prune import STRUCTURE_KEY, filter_structure
from variants.recover import recover
from variants.specs import EarlyExit
from variants.transforms import TransformContext, register_torch_transform

__all__ = ["EXIT_KEY", "DynamicEarlyExit", "ExitAdapter", "ExitResult", "build_dynamic_exit",
           "check_exit", "early_exit_module", "exit_adapter", "list_exit_families",
           "register_exit_adapter"]

log = logging.getLogger(__name__)


@register_torch_transform(EarlyExit)
def early_exit_module(module, spec: EarlyExit, arch: dict, ctx: TransformContext):
    """The ``EarlyExit`` transform: truncate after exit ``at``, train the head (backbone frozen)."""
    adapter = check_exit(ctx.family, arch, spec.at)
    n_parent = _count(module)
    exit_mod, arch = adapter.truncate(module, arch, spec.at)
    if STRUCTURE_KEY in arch:  # a pruned parent: keep only the record of what is left
        arch = {**arch, STRUCTURE_KEY: filter_structure(arch[STRUCTURE_KEY], exit_mod)}
    n = _count(exit_mod)
    ctx.report.update({"params_base": _count(ctx.base), "params_parent": n_parent,
                       "params_ratio": round(n / max(_count(ctx.base), 1), 6)})
    ctx.report.update(recover(exit_mod, ctx, head_only=True, label=f"exit{spec.at} head"))
    return exit_mod.eval(), arch


def _count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
