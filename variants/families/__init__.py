"""Model-family adapters, registered by name (``list_families()``, ``get_family(name)``)."""

from variants.families import bert as _bert  # noqa: F401  (registers)
from variants.families import custom as _custom  # noqa: F401
from variants.families import resnet as _resnet  # noqa: F401
from variants.families._base import (
    Built,
    Family,
    InputSpec,
    ModelInfo,
    family_of,
    get_family,
    list_families,
    list_models,
    register_family,
)

__all__ = ["Built", "Family", "InputSpec", "ModelInfo", "family_of", "get_family",
           "list_families", "list_models", "register_family"]
