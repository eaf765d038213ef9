"""The adaptive runtime: pure variant selection, the variant cache and its policies.

Importing this package never imports torch or onnxruntime (a test checks it), so the
selection code can run on made-up numbers and be embedded anywhere.
"""

from __future__ import annotations

from adaptive.budget import (
    BudgetSource,
    CallableBudget,
    CgroupBudget,
    CudaFreeBudget,
    FixedBudget,
    as_budget,
    list_budget_sources,
)
from adaptive.cache import CacheStats, InferResult, ModelStats, UnknownModelError, VariantCache
from adaptive.cache_config import CacheConfig
from adaptive.errors import AdaptiveError, CacheTimeout, InfeasibleBudget
from adaptive.select import Candidate, ModelDemand, Plan, select
from adaptive.units import format_size, parse_size

__all__ = [
    "AdaptiveError",
    "BudgetSource",
    "CacheConfig",
    "CacheStats",
    "CacheTimeout",
    "CallableBudget",
    "Candidate",
    "CgroupBudget",
    "CudaFreeBudget",
    "FixedBudget",
    "InfeasibleBudget",
    "InferResult",
    "ModelDemand",
    "ModelStats",
    "Plan",
    "UnknownModelError",
    "VariantCache",
    "as_budget",
    "format_size",
    "list_budget_sources",
    "parse_size",
    "select",
]
