"""Any ``nn.Module`` through the Python API: the ``custom`` family.

The user gives the module and example inputs; memadapt records input names,
dtypes and which axis is the batch. Rebuilding a custom model's torch
structure from the store needs its code, so register a factory with
:func:`register_custom_factory` (the ONNX artifacts never need it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from variants.errors import BackendError, DataError
from variants.families._base import Built, Family, InputSpec, ModelInfo, register_family
from variants.registry import Registry

_FACTORIES: Registry[Callable[[], Any]] = Registry("custom model factory")


def register_custom_factory(name: str, factory: Callable[[], Any], *,
                            replace: bool = False) -> None:
    """Let the store rebuild custom model ``name`` (``factory()`` returns a fresh module).
    Registering another factory under a registered name needs ``replace=True``."""
    _FACTORIES.register(name, factory, replace=replace)


@register_family
class CustomFamily(Family):
    name = "custom"
    task = "classification"

    def models(self) -> list[ModelInfo]:
        return []

    def handles(self, model: str) -> bool:
        return False

    def build(self, model: str, *, module=None, example_inputs=None, task: str = "classification",
              input_names: list[str] | None = None, num_exit_points: int = 0,
              **options: Any) -> Built:
        import torch

        if module is None or example_inputs is None:
            raise DataError("a custom model needs module= and example_inputs= "
                            "(a tensor or tuple of tensors with the batch on axis 0)")
        if task not in ("classification", "embedding"):
            raise DataError(f"task must be 'classification' or 'embedding', got {task!r}")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        example_inputs = tuple(example_inputs)
        names = input_names or (["input"] if len(example_inputs) == 1
                                else [f"input{i}" for i in range(len(example_inputs))])
        if len(names) != len(example_inputs):
            raise DataError(f"{len(names)} input names for {len(example_inputs)} example inputs")
        inputs = [InputSpec(n, str(t.dtype).removeprefix("torch."), ("batch", *t.shape[1:]))
                  for n, t in zip(names, example_inputs)]
        arch = {"family": self.name, "model": model, "task": task,
                "inputs": [i.to_dict() for i in inputs], "num_exit_points": num_exit_points}
        return Built(module.eval(), arch)

    def rebuild(self, arch: dict[str, Any]):
        from variants.transforms import rebuild_hooks

        factory = _FACTORIES.find(arch["model"])
        if factory is None:
            raise BackendError(f"custom model {arch['model']!r} has no registered factory; call "
                               f"variants.register_custom_factory({arch['model']!r}, fn) first "
                               f"or use the onnxruntime backend")
        module = factory()
        for hook in rebuild_hooks(self.name, arch):
            module = hook(module, arch)
        return module.eval()

    def inputs(self, arch):
        return [InputSpec.from_dict(d) for d in arch["inputs"]]

    def output_names(self, arch):
        return ["logits"] if arch.get("task") == "classification" else ["output"]

    def example_inputs(self, arch, batch, *, seed=0, seq_len=None):
        import torch

        g = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.inputs(arch):
            shape = [batch if d == "batch" else (seq_len or 16) if isinstance(d, str) else d
                     for d in spec.shape]
            dtype = getattr(torch, spec.dtype)
            if dtype.is_floating_point:
                out.append(torch.randn(*shape, generator=g).to(dtype))
            else:
                out.append(torch.randint(0, 2, shape, generator=g, dtype=dtype))
        return tuple(out)

    def num_exit_points(self, arch):
        return int(arch.get("num_exit_points", 0))

    def data_inputs(self, arch, data):
        import numpy as np
        import torch

        if isinstance(data, tuple):
            return tuple(torch.as_tensor(np.asarray(d)) for d in data)
        return (torch.as_tensor(np.asarray(data), dtype=torch.float32),)
