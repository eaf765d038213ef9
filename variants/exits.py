"""Exit points: the contract a family implements to be cut at them, and its registry.

An exit point ``k`` is a place where a prefix of the model can stop and answer
through a small head: ResNet exit ``k`` follows ``layer{k}`` (1..3), BERT exit
``k`` follows encoder layer ``k`` (1..L-1). Each family registers an
:class:`ExitAdapter` (:func:`register_exit_adapter`, next to the family: see
:mod:`variants.families.resnet` and :mod:`variants.families.bert`); the
``EarlyExit`` transform (:mod:`variants.early_exit`), the dynamic runner
(:mod:`variants.dynamic_exit`) and the in-place moves of :mod:`variants.shared`
only talk to the adapter. Importing this module does not import torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from variants.errors import SpecError
from variants.registry import Registry
from variants.transforms import register_rebuild_hook

#: the arch key under which a truncated variant records its exit point and head
EXIT_KEY = "exit"


class ExitAdapter(ABC):
    """How one family truncates, rebuilds and splits into stages at its exit points."""

    family: ClassVar[str]

    @abstractmethod
    def truncate(self, module, arch: dict, at: int) -> tuple[Any, dict]:
        """The exit-``at`` variant of ``module`` (changed in place) and its arch."""

    @abstractmethod
    def rebuild(self, module, arch: dict):
        """Turn the rebuilt base structure into the stored exit variant's structure.

        ``module`` holds only the prefix by then (:meth:`cut_prefix` has run on it)."""

    @abstractmethod
    def stages(self, module, arch: dict) -> tuple[list, Any]:
        """The model as consecutive stages (exit ``k`` follows stage ``k``) and its final head.

        Stages and final head share ``module``'s submodules (no copies).
        """

    @abstractmethod
    def new_head(self, module, arch: dict, at: int):
        """An untrained exit head for the state after stage ``at``."""

    def cut_prefix(self, module, at: int) -> None:
        """Drop, in place, what ``module`` holds beyond exit ``at`` that :meth:`rebuild`
        would keep (a BERT's later encoder layers). The default does nothing: an adapter
        whose :meth:`rebuild` picks the prefix's parts itself needs no cut."""
        return None

    def head_keys(self, exit_module) -> frozenset[str]:
        """Names of the exit module's head tensors: everything in it that is *not* the
        full model's prefix (for a BERT classifier that includes its fine-tuned pooler
        and classifier, whose names the full model also has)."""
        ids = {id(p) for p in exit_module.head_parameters()}
        return frozenset(n for n, p in exit_module.named_parameters(remove_duplicate=False)
                         if id(p) in ids)


_ADAPTERS: Registry[ExitAdapter] = Registry("exit adapter")


def register_exit_adapter(cls: type[ExitAdapter]) -> type[ExitAdapter]:
    """Class decorator: early-exit support for ``cls.family`` (and its rebuild hook)."""
    adapter = _ADAPTERS.register(cls.family, cls())
    # after the shape hooks: the exit wraps the pruned structure
    register_rebuild_hook(cls.family, EXIT_KEY, order=1)(adapter.rebuild)
    return cls


def list_exit_families() -> list[str]:
    return _ADAPTERS.names()


def exit_adapter(family: str) -> ExitAdapter:
    if family not in _ADAPTERS:
        raise SpecError(f"early exit is not implemented for family {family!r}; families with "
                        f"exit points: {', '.join(list_exit_families())}")
    return _ADAPTERS.get(family)


def check_exit(family, arch: dict, at: int) -> ExitAdapter:
    """Validate exit point ``at`` for this model (SpecError names the valid range)."""
    family.check_exit(arch, at)
    return exit_adapter(family.name)
