"""The ResNet family: every torchvision ResNet, ResNeXt and wide ResNet."""

from __future__ import annotations

from typing import Any

from variants.errors import DataError, UnknownNameError
from variants.exits import EXIT_KEY, ExitAdapter, register_exit_adapter
from variants.families._base import Built, Family, InputSpec, ModelInfo, register_family
from variants.weights import load_weights_into

# name -> (torchvision constructor, params at 1000 classes, note)
_RESNETS: dict[str, tuple[str, int]] = {
    "resnet10": ("", 5_418_792),  # BasicBlock [1,1,1,1]: small enough for fast tests
    "resnet18": ("resnet18", 11_689_512),
    "resnet34": ("resnet34", 21_797_672),
    "resnet50": ("resnet50", 25_557_032),
    "resnet101": ("resnet101", 44_549_160),
    "resnet152": ("resnet152", 60_192_808),
    "resnext50_32x4d": ("resnext50_32x4d", 25_028_904),
    "resnext101_32x8d": ("resnext101_32x8d", 88_791_336),
    "resnext101_64x4d": ("resnext101_64x4d", 83_455_272),
    "wide_resnet50_2": ("wide_resnet50_2", 68_883_240),
    "wide_resnet101_2": ("wide_resnet101_2", 126_886_696),
}


def _construct(model: str, num_classes: int, pretrained: bool = False):
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    if model == "resnet10":
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    ctor = getattr(torchvision.models, _RESNETS[model][0])
    if pretrained:
        # Only where the user has network access: torchvision downloads the weights.
        m = ctor(weights="DEFAULT")
        if num_classes != m.fc.out_features:
            import torch.nn as nn

            m.fc = nn.Linear(m.fc.in_features, num_classes)
        return m
    return ctor(num_classes=num_classes)


@register_family
class ResNetFamily(Family):
    """torchvision ResNets; input ``input`` (B, 3, H, W) float32, output ``logits`` (B, C)."""

    name = "resnet"
    task = "classification"
    #: stage names after which an early exit can be taken (exit k follows layer k)
    exit_stages = ("layer1", "layer2", "layer3")

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(n, self.name, self.task, p,
                          "torchvision " + (ctor or "ResNet(BasicBlock, [1,1,1,1])"),
                          "random init; --weights FILE or --pretrained")
                for n, (ctor, p) in _RESNETS.items()]

    def build(self, model: str, *, num_classes: int | None = None, weights: str | None = None,
              pretrained: bool = False, resolution: int = 224, data_resolution: int = 32,
              **options: Any) -> Built:
        if model not in _RESNETS:
            raise UnknownNameError("model", model, list(_RESNETS))
        if options:
            raise TypeError(f"unknown options for the ResNet family: {sorted(options)}")
        num_classes = int(num_classes or 1000)
        if num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {num_classes}")
        if resolution < 32 or data_resolution < 32:
            raise DataError("ResNets need inputs of at least 32x32 pixels "
                            f"(got resolution={resolution}, data_resolution={data_resolution})")
        module = _construct(model, num_classes, pretrained=pretrained and not weights)
        if weights:
            load_weights_into(module, weights, model=model)
        module.eval()
        arch = {"family": self.name, "model": model, "num_classes": num_classes,
                "resolution": int(resolution), "data_resolution": int(data_resolution)}
        return Built(module, arch)

    def rebuild(self, arch: dict[str, Any]):
        from variants.transforms import rebuild_hooks

        module = _construct(arch["model"], arch["num_classes"])
        for hook in rebuild_hooks(self.name, arch):
            module = hook(module, arch)
        return module.eval()

    def inputs(self, arch: dict[str, Any]) -> list[InputSpec]:
        # spatial axes stay dynamic: ResNets pool adaptively, so one graph serves the
        # profiling resolution (224) and the data resolution (digits at 32) alike
        return [InputSpec("input", "float32", ("batch", 3, "height", "width"))]

    def example_inputs(self, arch, batch, *, seed=0, seq_len=None):
        import torch

        g = torch.Generator().manual_seed(seed)
        r = arch["resolution"]
        return (torch.randn(batch, 3, r, r, generator=g),)

    def num_exit_points(self, arch: dict[str, Any]) -> int:
        return len(self.exit_stages)

    def data_inputs(self, arch, data):
        """Images (N, C, h, w) or (N, h, w) in [0, 1] -> normalized (N, 3, r, r)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"ResNet inputs must be images shaped (N, 1|3, H, W) or (N, H, W); "
                            f"got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        r = arch.get("data_resolution", arch["resolution"])
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return ((x - mean) / std,)


# ---- exit points -----------------------------------------------------------------------------

@register_exit_adapter
class ResNetExits(ExitAdapter):
    """Exit ``k`` follows ``layer{k}``; its head average-pools to a 2x2 grid and classifies
    with one Linear (:class:`variants.families._resnet_nn.PooledLinearHead`)."""

    family = "resnet"

    #: side of the pooled grid the exit heads classify from
    pool = 2

    @staticmethod
    def _channels(module, at: int) -> int:
        from torch import nn

        bns = [m for m in getattr(module, f"layer{at}").modules() if isinstance(m, nn.BatchNorm2d)]
        return bns[-1].num_features

    def new_head(self, module, arch, at):
        from variants.families._resnet_nn import PooledLinearHead

        return PooledLinearHead(self._channels(module, at), module.fc.out_features, self.pool)

    def truncate(self, module, arch, at):
        arch = {**arch, EXIT_KEY: {"at": at, "head": "pooled-linear",
                                   "channels": self._channels(module, at), "pool": self.pool,
                                   "classes": module.fc.out_features}}
        return self.rebuild(module, arch), arch

    def rebuild(self, module, arch):
        """:class:`ResNetExit` takes the prefix's layers itself, so no cut is needed."""
        from variants.families._resnet_nn import PooledLinearHead, ResNetExit

        spec = arch[EXIT_KEY]
        return ResNetExit(module, spec["at"], PooledLinearHead(spec["channels"], spec["classes"],
                                                               spec["pool"]))

    def stages(self, module, arch):
        from torch import nn

        stem = nn.Sequential(module.conv1, module.bn1, module.relu, module.maxpool, module.layer1)
        final = nn.Sequential(module.avgpool, nn.Flatten(1), module.fc)
        return [stem, module.layer2, module.layer3, module.layer4], final
