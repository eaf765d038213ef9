"""Shared by the family examples: plans for a few fractions of the full memory, as a table."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from adaptive import ModelDemand, format_size, select


def plans_table(demands: Sequence[ModelDemand], fractions: Sequence[float], title: str) -> Table:
    """One row per budget (a fraction of every model at its largest variant): each model's
    chosen variant, the memory used and the utility."""
    full = sum(max(c.memory_bytes for c in d.candidates) for d in demands)
    t = Table(title=title)
    for col in ("budget", *[d.model for d in demands], "memory", "utility"):
        t.add_column(col)
    for frac in fractions:
        budget = int(full * frac)
        plan = select(demands, budget)
        t.add_row(f"{format_size(budget)} ({frac:.0%})",
                  *[plan.choice[d.model] or "-" for d in demands],
                  format_size(plan.memory_bytes), f"{plan.utility:.3f}")
    return t
