"""Transformation registry: implementations register against the spec *type*.

Torch-stage transforms (prune, early exit) map an ``nn.Module`` to a new
module and architecture; ONNX-stage transforms (quantize) map the parent's
ONNX file to a new one. Rebuild hooks let a family's ``rebuild(arch)``
reproduce a transformed structure (e.g. pruned channel counts) before the
stored safetensors are loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from variants.errors import SpecError
from variants.registry import Registry
from variants.specs import Spec

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


@dataclass
class TransformContext:
    """What a transformation may use besides the model itself."""

    family: Any  # variants.families.Family
    base: Any  # the untransformed base nn.Module (the distillation teacher)
    base_arch: dict[str, Any]
    calib: Any  # variants.data.Calibration
    seed: int = 0
    recover_steps: int | None = None
    workdir: Path | None = None
    progress: ProgressFn | None = None
    #: metrics a transform wants recorded in the manifest (e.g. fidelity before/after recovery)
    report: dict[str, Any] = field(default_factory=dict)

    def tick(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)


TorchTransform = Callable[[Any, Spec, dict, TransformContext], tuple[Any, dict]]
OnnxTransform = Callable[[Path, Path, Spec, dict, TransformContext], None]

# keyed by the spec's kind ("prune", "exit", "quantize")
_TORCH: Registry[TorchTransform] = Registry("torch transform", error=SpecError)
_ONNX: Registry[OnnxTransform] = Registry("ONNX transform", error=SpecError)
_REBUILD: list[tuple[int, str | None, str, Callable[[Any, dict], Any]]] = []


def register_torch_transform(spec_type: type[Spec]):
    """Decorator: ``fn(module, spec, arch, ctx) -> (new_module, new_arch)``."""
    return _TORCH.register(spec_type.kind)


def register_onnx_transform(spec_type: type[Spec]):
    """Decorator: ``fn(src_onnx, dst_onnx, spec, arch, ctx) -> None``."""
    return _ONNX.register(spec_type.kind)


def register_rebuild_hook(family: str | None, arch_key: str, *, order: int = 0):
    """Decorator: ``fn(module, arch) -> module``, run by ``rebuild`` when ``arch_key`` in arch.

    Hooks run by ascending ``order``, then in registration order: shape hooks (pruning,
    0) before wrapping hooks (early exit, 1), whichever module was imported first."""
    def deco(fn):
        _REBUILD.append((order, family, arch_key, fn))
        return fn
    return deco


def rebuild_hooks(family: str, arch: dict) -> list[Callable[[Any, dict], Any]]:
    hooks = sorted(enumerate(_REBUILD), key=lambda ih: (ih[1][0], ih[0]))
    return [fn for _, (_, fam, key, fn) in hooks
            if (fam is None or fam == family) and key in arch]


def torch_transform(spec: Spec) -> TorchTransform:
    return _TORCH.get(spec.kind)


def onnx_transform(spec: Spec) -> OnnxTransform:
    return _ONNX.get(spec.kind)


def list_transforms() -> list[str]:
    return sorted({*_TORCH.names(), *_ONNX.names()})
