"""The GPU check's plan: which models and variants, which steps, batches and time limits.

A :class:`Plan` is frozen and travels to each child process as JSON. The full plan is
ResNet-50 at 224x224 and BERT-base (seq 128) on ``cuda:0``; ``--cpu-smoke`` is the same
plan on the CPU with tiny models (ResNet-10 at 32x32, BERT-tiny at seq 16), so the
smoke run exercises every code path the device run takes.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = 2
MiB = 1 << 20

#: in priority order; a step whose input an earlier step failed to make is skipped
STEPS = ("generate", "bandwidth", "downgrade", "profile", "serve")
#: what each step needs done first
NEEDS = {"downgrade": ("generate",), "profile": ("generate",), "serve": ("profile",)}
#: seconds a step needs at least (imports, CUDA start, model build) before it is worth starting
MIN_STEP_S = {"generate": 60.0, "bandwidth": 10.0, "profile": 60.0, "serve": 30.0,
              "downgrade": 30.0}
#: the child's deadline is this much before the parent's, so the parent can still write
CHILD_MARGIN_S = 4.0

#: targets
UPGRADE_FRACTION = 0.70
FP16_RATIO = (0.45, 0.55)
PEAK_TOLERANCE = 0.10
#: a swapped-in model must answer like the resident one (fp16/TF32 kernels may differ slightly)
SWAP_TOLERANCE = 1e-2


@dataclass(frozen=True)
class ModelPlan:
    """One model and the variants the check makes of it through ``variants.generate``."""

    key: str  # "resnet" or "bert": the label in the report
    name: str  # a built-in model name (``memadapt models``)
    options: dict[str, Any] = field(default_factory=dict)  # family build options
    prune: float = 0.5
    exit: int = 2

    @property
    def base(self) -> str:
        return self.name

    def variant(self, kind: str) -> str:
        """The stored name of variant ``kind`` (fp32, fp16, prune, exit)."""
        from variants import EarlyExit, Prune, Quantize, variant_name

        specs = {"fp32": [], "fp16": [Quantize("fp16")], "prune": [Prune(self.prune)],
                 "exit": [EarlyExit(self.exit)]}[kind]
        return variant_name(self.name, specs)

    def variants(self) -> dict[str, str]:
        return {k: self.variant(k) for k in ("fp32", "fp16", "prune", "exit")}


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    mode: str  # "full", "quick" or "cpu-smoke"
    device: str  # "cuda:0" or "cpu"
    models: tuple[ModelPlan, ...]
    #: batch sizes the downgrade step reads the allocator peak at
    batches: tuple[int, ...]
    #: batch sizes the profiler measures (the cache charges memory at the largest)
    profile_batches: tuple[int, ...]
    runs: int
    warmup: int
    #: backends the profiler measures every variant with (torch skips ONNX-only fp16)
    backends: tuple[str, ...]
    #: the VariantCache's backend in the serve step
    serve_backend: str
    recover_steps: int
    calib: str
    eval_samples: int
    bandwidth_mib: int
    bandwidth_reps: int
    downgrade_reps: int
    threads: int | None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        d["models"] = tuple(ModelPlan(**m) for m in d["models"])
        for k in ("batches", "profile_batches", "backends"):
            d[k] = tuple(d[k])
        return cls(**d)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.cpu_smoke:
        return Plan(
            mode="cpu-smoke", device="cpu",
            models=(ModelPlan("resnet", "resnet10", {"num_classes": 10, "resolution": 32},
                              exit=2),
                    ModelPlan("bert", "bert-tiny", {"seq_len": 16}, exit=1)),
            batches=(1, 2), profile_batches=(1,), runs=2, warmup=1,
            backends=("onnxruntime", "torch"),
            serve_backend="torch", recover_steps=1, calib="random", eval_samples=8,
            bandwidth_mib=16, bandwidth_reps=2, downgrade_reps=1, threads=1)
    quick = bool(args.quick)
    return Plan(
        mode="quick" if quick else "full", device=args.device,
        models=(ModelPlan("resnet", "resnet50", {"num_classes": 1000, "resolution": 224},
                          exit=2),
                ModelPlan("bert", "bert-base", {"seq_len": 128}, exit=6)),
        batches=(1, 8, 32) if quick else (1, 8, 32, 128),
        profile_batches=(1, 32) if quick else (1, 8, 32), runs=10 if quick else 30,
        warmup=3 if quick else 5, backends=("torch", "onnxruntime"), serve_backend="torch",
        recover_steps=2, calib="random", eval_samples=32, bandwidth_mib=256,
        bandwidth_reps=5 if quick else 10, downgrade_reps=2 if quick else 3, threads=None)
