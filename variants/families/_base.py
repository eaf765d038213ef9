"""The family-adapter contract and its registry.

A family adapter knows what a model family needs to be transformed: how to
build (and rebuild from a stored architecture) its members, their example
inputs and dynamic axes, which layers pruning must not touch, where the exit
points are, and how to turn calibration/evaluation data into model inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from variants.errors import SpecError, UnknownNameError
from variants.registry import Registry

if TYPE_CHECKING:  # torch is imported lazily so `import variants` stays light
    import torch
    from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, dtype and shape (str entries are dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class ModelInfo:
    """A built-in model name, as listed by ``memadapt models``."""

    name: str
    family: str
    task: str
    params: int
    description: str
    source: str = "random init"


@dataclass
class Built:
    """A built model: the exportable module and the architecture needed to rebuild it."""

    module: nn.Module
    arch: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class Family(ABC):
    """Adapter for one model family. Subclasses register with :func:`register_family`."""

    name: ClassVar[str]
    #: "classification" (logits, top-1 agreement) or "embedding" (hidden states, cosine)
    task: ClassVar[str] = "classification"

    @abstractmethod
    def models(self) -> list[ModelInfo]:
        """The built-in model names of this family."""

    def handles(self, model: str) -> bool:
        return any(m.name == model for m in self.models())

    @abstractmethod
    def build(self, model: str, *, num_classes: int | None = None, weights: str | None = None,
              pretrained: bool = False, **options: Any) -> Built:
        """Build a model by name (random init unless ``weights``/``pretrained``)."""

    @abstractmethod
    def rebuild(self, arch: dict[str, Any]) -> nn.Module:
        """Rebuild the module structure from a stored ``arch`` (weights loaded separately)."""

    @abstractmethod
    def inputs(self, arch: dict[str, Any]) -> list[InputSpec]:
        """Input names, dtypes and shapes with dynamic axes named."""

    @abstractmethod
    def example_inputs(self, arch: dict[str, Any], batch: int, *, seed: int = 0,
                       seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs of the serving shape for export checks and profiling."""

    def output_names(self, arch: dict[str, Any]) -> list[str]:
        return ["logits"] if self.task == "classification" else ["last_hidden_state"]

    def num_exit_points(self, arch: dict[str, Any]) -> int:
        """How many early-exit points the model has (0: early exit unsupported)."""
        return 0

    def check_exit(self, arch: dict[str, Any], at: int) -> None:
        n = self.num_exit_points(arch)
        if n == 0:
            raise SpecError(f"family {self.name!r} has no early-exit points; drop --exit")
        if not 1 <= at <= n:
            raise SpecError(f"exit point {at} is out of range for {arch.get('model')!r}: "
                            f"valid exit points are 1..{n}")

    def data_inputs(self, arch: dict[str, Any], data: Any) -> tuple[torch.Tensor, ...]:
        """Turn a batch of calibration/evaluation data into model inputs."""
        raise NotImplementedError(f"family {self.name!r} cannot consume data of type "
                                  f"{type(data).__name__}")


_FAMILIES: Registry[Family] = Registry("family")


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register a family adapter under ``cls.name``."""
    _FAMILIES.register(cls.name, cls())
    return cls


def list_families() -> list[str]:
    return _FAMILIES.names()


def get_family(name: str) -> Family:
    return _FAMILIES.get(name)


def list_models(pattern: str = "*") -> list[ModelInfo]:
    """Every built-in model name across families, optionally filtered by a glob."""
    import fnmatch

    out = [m for f in _FAMILIES.values() for m in f.models()]
    return sorted((m for m in out if fnmatch.fnmatch(m.name, pattern)), key=lambda m: m.name)


def family_of(model: str) -> Family:
    """The family that builds ``model`` (a built-in name)."""
    for fam in _FAMILIES.values():
        if fam.handles(model):
            return fam
    raise UnknownNameError("model", model, [m.name for m in list_models()])
