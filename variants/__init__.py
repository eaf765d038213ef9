"""memadapt.variants: making and loading model variants.

Public API: specs (``Prune``, ``EarlyExit``, ``Quantize``), the family registry
(``list_models``, ``get_family``), ``generate``, the ``Store`` and
``open_session``. Importing this package does not import torch.
"""

from variants import early_exit as _early_exit  # noqa: F401  (registers exit@k)
from variants import prune as _prune  # noqa: F401  (registers prune)
from variants import quantize as _quantize  # noqa: F401  (registers int8/fp16)
from variants._locks import StoreLockedError
from variants.backends import Session, list_backends, open_onnx, open_session, register_backend
from variants.errors import (
    BackendError,
    CorruptArtifactError,
    DataError,
    ExportError,
    KeyConflictError,
    MemadaptError,
    SpecError,
    StoreError,
    UnknownNameError,
)
from variants.families import (
    Family,
    ModelInfo,
    family_of,
    get_family,
    list_families,
    list_models,
    register_family,
)
from variants.families.custom import register_custom_factory
from variants.generate import GenerateResult, generate, plan_chains
from variants.groups import Group, GroupError, group, list_groups
from variants.specs import (
    EarlyExit,
    Prune,
    Quantize,
    Spec,
    parse_spec,
    parse_variant_name,
    spec_from_dict,
    validate_chain,
    variant_name,
)
from variants.store import Manifest, Store
from variants.transforms import list_transforms

__all__ = [
    "BackendError", "CorruptArtifactError", "DataError", "EarlyExit", "ExportError", "Family",
    "GenerateResult", "Group", "GroupError", "KeyConflictError", "Manifest", "MemadaptError",
    "ModelInfo", "Prune", "Quantize", "Session",
    "Spec", "SpecError", "Store", "StoreError", "StoreLockedError", "UnknownNameError",
    "family_of", "generate",
    "get_family", "group", "list_backends", "list_families", "list_groups", "list_models",
    "list_transforms",
    "open_onnx", "open_session", "parse_spec", "parse_variant_name", "plan_chains",
    "register_backend", "register_custom_factory", "register_family", "spec_from_dict",
    "validate_chain", "variant_name",
]
