"""The adaptive runtime: pure variant selection, the variant cache and its policies.

Importing this package never imports torch or onnxruntime (a test checks it), so the
selection code can run on made-up numbers and be embedded anywhere.
"""

from __future__ import annotations

from adaptive.errors import InfeasibleBudget
from adaptive.select import Candidate, ModelDemand, Plan, select
from adaptive.units import format_size, parse_size

__all__ = [
    "Candidate",
    "InfeasibleBudget",
    "ModelDemand",
    "Plan",
    "format_size",
    "parse_size",
    "select",
]
