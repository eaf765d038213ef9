"""Errors raised by the adaptive runtime.

Kept free of torch/onnxruntime imports so selection can be embedded anywhere.
"""

from __future__ import annotations


class AdaptiveError(Exception):
    """Base class of errors raised by :mod:`adaptive`."""


class InfeasibleBudget(AdaptiveError):
    """No variant of a model that meets its accuracy floor fits the memory budget."""

    def __init__(self, model: str, smallest_variant: str | None, smallest_bytes: int | None,
                 budget_bytes: int, floor: float):
        self.model = model
        self.smallest_variant = smallest_variant
        self.smallest_bytes = smallest_bytes
        self.budget_bytes = budget_bytes
        self.floor = floor
        if smallest_variant is None:
            msg = (f"model {model!r} has no variant with accuracy >= its floor {floor:g}; "
                   f"lower the floor or generate more accurate variants")
        else:
            msg = (f"model {model!r}: its smallest variant meeting the floor {floor:g} is "
                   f"{smallest_variant!r} ({smallest_bytes} bytes), which does not fit the "
                   f"budget of {budget_bytes} bytes; raise the budget or lower the floor")
        super().__init__(msg)

    def __reduce__(self):  # copy/pickle rebuild it from its fields, not from the message
        return (type(self), (self.model, self.smallest_variant, self.smallest_bytes,
                             self.budget_bytes, self.floor))


class CacheTimeout(AdaptiveError, TimeoutError):
    """A wait of the variant cache (for a load, a drain, memory) ran past its deadline."""
