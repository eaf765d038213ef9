"""The dynamic early-exit runtime: the whole model in stages with a head after each.

:class:`DynamicEarlyExit` keeps the *whole* model plus a head at every exit and stops
per sample as soon as a head is confident enough; :func:`build_dynamic_exit` splits a
model at its exit points (through the family's :class:`~variants.exits.ExitAdapter`),
trains the heads by distillation and calibrates the thresholds. Unlike a truncated
``exit@k`` variant it cannot be one static graph: it runs from Python, in torch or as
one onnxruntime session per stage.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from variants.backends import open_onnx
from variants.errors import ExportError, SpecError
from variants.exits import exit_adapter
from variants.families import get_family
from variants.recover import _as_tuple, recover, task_kind
from variants.transforms import TransformContext

__all__ = ["DynamicEarlyExit", "ExitResult", "build_dynamic_exit"]

log = logging.getLogger(__name__)


class ExitResult(NamedTuple):
    outputs: Any  # torch.Tensor (B, classes)
    exits: Any  # torch.LongTensor (B,): exit taken, 1..num_exits; num_exits = the full model


class DynamicEarlyExit:
    """The full model in stages with a head after each; each sample stops at the first
    head whose softmax confidence reaches that exit's threshold.

    Memory is the full model plus the heads (a few Linears), so this is a latency
    variant, not a memory variant: easy inputs leave early, hard ones pay for the
    whole model, and the thresholds (calibrated by :meth:`calibrate` to a target
    top-1 agreement with the full model) bound how much accuracy that costs.

    Python with torch::

        runner = build_dynamic_exit(module, "resnet", arch, calib, target_fidelity=0.99)
        outputs, exits = runner.run(images)       # (B, C) logits, (B,) exit per sample
        runner.stats()                            # thresholds, exits taken, fidelity

    With onnxruntime: ``runner.export_onnx(folder)`` writes one graph per stage and
    per head plus ``thresholds.json``; ``DynamicEarlyExit.from_onnx(folder)`` runs
    them as onnxruntime sessions with the same per-sample logic (stages must pass
    one tensor between them, as ResNet stages do).
    """

    def __init__(self, stages: Sequence[Callable], heads: Sequence[Callable],
                 thresholds: Sequence[float] | None = None):
        if len(heads) != len(stages) or len(stages) < 2:
            raise ValueError(f"need one head per stage and at least 2 stages, got "
                             f"{len(stages)} stages and {len(heads)} heads")
        self.stages, self.heads = list(stages), list(heads)
        self.thresholds = list(thresholds) if thresholds is not None else \
            [math.inf] * (len(stages) - 1)
        self.target_fidelity: float | None = None
        self.calibration: dict[str, Any] = {}
        self.head_reports: list[dict[str, Any]] = []
        self._counts = [0] * len(stages)

    @property
    def num_exits(self) -> int:
        """Exits 1..num_exits; the last one is the full model."""
        return len(self.stages)

    def _all_exits(self, inputs: tuple) -> list:
        """Every head's output on every sample (for calibration)."""
        import torch

        outs, state = [], inputs
        with torch.inference_mode():
            for stage, head in zip(self.stages, self.heads):
                state = _as_tuple(stage(*state))
                outs.append(head(*state).float())
        return outs

    def run(self, inputs) -> ExitResult:
        """Outputs and the exit taken per sample; each sample stops at its first confident head."""
        import torch

        state = tuple(_tensor(x) for x in _as_tuple(inputs))
        batch = len(state[0])
        outputs, exits = None, torch.full((batch,), self.num_exits, dtype=torch.long)
        active = torch.arange(batch)
        with torch.inference_mode():
            for k, (stage, head) in enumerate(zip(self.stages, self.heads)):
                state = _as_tuple(stage(*state))
                y = head(*state).float()
                if outputs is None:
                    outputs = y.new_zeros((batch, *y.shape[1:]))
                last = k == self.num_exits - 1
                done = torch.ones(len(y), dtype=torch.bool) if last else \
                    y.softmax(-1).amax(-1) >= self.thresholds[k]
                outputs[active[done]] = y[done]
                exits[active[done]] = k + 1
                self._counts[k] += int(done.sum())
                active, state = active[~done], _select(state, ~done, len(y))
                if not len(active):
                    break
        return ExitResult(outputs, exits)

    def calibrate(self, calib, target_fidelity: float = 0.99) -> list[float]:
        """Choose per-exit thresholds: at each exit the lowest confidence threshold whose
        exiting calibration samples agree with the full model's top-1 at ``target_fidelity``
        (so the overall agreement on the calibration data is at least that)."""
        import torch

        if not 0 < target_fidelity <= 1:
            raise SpecError(f"target_fidelity must be in (0, 1], got {target_fidelity!r}")
        confs, agree = [[] for _ in self.heads[:-1]], [[] for _ in self.heads[:-1]]
        for batch in calib:
            outs = self._all_exits(tuple(_tensor(x) for x in _as_tuple(tuple(batch))))
            final = outs[-1].argmax(-1)
            for k, y in enumerate(outs[:-1]):
                confs[k].append(y.softmax(-1).amax(-1))
                agree[k].append(y.argmax(-1) == final)
        conf = [torch.cat(c) for c in confs]
        ok = [torch.cat(a) for a in agree]
        active = torch.ones(len(conf[0]), dtype=torch.bool)
        counts, agreeing = [], 0
        self.thresholds = []
        for c, a in zip(conf, ok):
            t = _lowest_threshold(c[active], a[active], target_fidelity)
            leave = active & (c >= t)
            self.thresholds.append(t)
            counts.append(int(leave.sum()))
            agreeing += int((a & leave).sum())
            active &= ~leave
        counts.append(int(active.sum()))
        n = len(active)
        self.target_fidelity = target_fidelity
        self.calibration = {"samples": n, "fidelity": (agreeing + counts[-1]) / max(n, 1),
                            "exit_counts": dict(enumerate(counts, 1))}
        log.info("dynamic exit thresholds %s (calibration fidelity %.4f)", self.thresholds,
                 self.calibration["fidelity"])
        return self.thresholds

    def reset_stats(self) -> None:
        self._counts = [0] * self.num_exits

    def stats(self) -> dict[str, Any]:
        """Exits taken since the last reset, thresholds and the calibration results."""
        total = sum(self._counts)
        mean = sum((k + 1) * c for k, c in enumerate(self._counts)) / total if total else None
        return {"samples": total, "exit_counts": dict(enumerate(self._counts, 1)),
                "mean_exit": mean, "num_exits": self.num_exits,
                "thresholds": [None if math.isinf(t) else t for t in self.thresholds],
                "target_fidelity": self.target_fidelity, "calibration": self.calibration,
                "heads": self.head_reports}

    # -- onnxruntime ----------------------------------------------------------------------

    def export_onnx(self, folder: str | Path, example_inputs) -> Path:
        """Write ``stage{k}.onnx``, ``head{k}.onnx`` and ``thresholds.json`` to ``folder``."""
        import torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = tuple(_tensor(x) for x in _as_tuple(example_inputs))
        for k, (stage, head) in enumerate(zip(self.stages, self.heads), 1):
            for kind, part in (("stage", stage), ("head", head)):
                if len(state) != 1:
                    raise ExportError("per-stage ONNX needs stages that pass one tensor; "
                                      f"stage {k} passes {len(state)}")
                _export_part(part, state, folder / f"{kind}{k}.onnx")
                if kind == "stage":
                    with torch.no_grad():
                        state = _as_tuple(stage(*state))
        (folder / "thresholds.json").write_text(json.dumps(
            {"thresholds": [None if math.isinf(t) else t for t in self.thresholds],
             "num_exits": self.num_exits, "target_fidelity": self.target_fidelity}))
        return folder

    @classmethod
    def from_onnx(cls, folder: str | Path, device: str = "cpu") -> DynamicEarlyExit:
        """A runner over the graphs written by :meth:`export_onnx`, in onnxruntime."""
        folder = Path(folder)
        meta = json.loads((folder / "thresholds.json").read_text())
        n = int(meta["num_exits"])
        stages = [_OrtPart(folder / f"stage{k}.onnx", device) for k in range(1, n + 1)]
        heads = [_OrtPart(folder / f"head{k}.onnx", device) for k in range(1, n + 1)]
        runner = cls(stages, heads, [math.inf if t is None else t for t in meta["thresholds"]])
        runner.target_fidelity = meta.get("target_fidelity")
        return runner


def _tensor(x):
    import numpy as np
    import torch

    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _select(state: tuple, keep, batch: int) -> tuple:
    """Rows ``keep`` of every per-sample tensor in ``state`` (broadcast ones stay)."""
    return tuple(s[keep] if s is not None and hasattr(s, "shape") and s.ndim and
                 s.shape[0] == batch else s for s in state)


def _lowest_threshold(conf, agree, target: float) -> float:
    """Lowest confidence t such that samples with conf >= t agree at rate >= target."""
    import torch

    if not len(conf):
        return math.inf
    order = torch.argsort(conf, descending=True)
    c, a = conf[order], agree[order].double()
    rate = a.cumsum(0) / torch.arange(1, len(a) + 1, dtype=torch.double)
    # a cut is only valid where the confidence drops (ties exit together)
    valid = torch.ones(len(c), dtype=torch.bool)
    valid[:-1] = c[:-1] > c[1:]
    good = torch.nonzero(valid & (rate >= target)).flatten()
    return float(c[good[-1]]) if len(good) else math.inf


def _export_part(part, state: tuple, path: Path) -> None:
    import contextlib
    import io
    import warnings

    import torch

    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(part.eval(), state, str(path), dynamo=True, external_data=False,
                              input_names=["x"], output_names=["y"],
                              dynamic_shapes=(dims,), verbose=False)
    except Exception as e:  # noqa: BLE001 - exporter errors are many and deep
        raise ExportError(f"cannot export {path.name}: {type(e).__name__}: {e}") from e


class _OrtPart:
    """An onnxruntime session called like a stage or head (torch tensors in and out)."""

    def __init__(self, path: Path, device: str):
        self._sess = open_onnx(path, device=device)

    def __call__(self, *state):
        import torch

        return torch.from_numpy(self._sess.run([s.numpy() for s in state]))


def build_dynamic_exit(module, family, arch: dict, calib, target_fidelity: float = 0.99, *,
                       steps: int | None = None, seed: int = 0,
                       progress: Callable[[str, int, int], None] | None = None,
                       ) -> DynamicEarlyExit:
    """Split ``module`` at every exit point, train a head per exit by distillation from
    ``module`` itself (its weights untouched), and calibrate the thresholds on ``calib``.

    ``family`` is a family name or adapter; ``calib`` a :class:`variants.data.Calibration`
    (a data-set source trains heads on its ``train`` split) or a list of input tuples.
    ``steps`` overrides the family's default head-training steps.
    """
    fam = get_family(family) if isinstance(family, str) else family
    if task_kind(fam, arch) != "classification":
        raise SpecError(f"dynamic early exit stops on softmax confidence, so it needs a "
                        f"classifier; {arch.get('model')!r} outputs hidden states (use a "
                        f"truncated exit variant, EarlyExit(k), instead)")
    from variants._exit_nn import StagedExit

    adapter = exit_adapter(fam.name)
    module = module.eval()
    stages, final = adapter.stages(module, arch)
    ctx = TransformContext(family=fam, base=module, base_arch=arch, calib=calib, seed=seed,
                           recover_steps=steps, progress=progress)
    heads, reports = [], []
    for k in range(1, len(stages)):
        head = adapter.new_head(module, arch, k)
        student = StagedExit(stages[:k], head)
        reports.append(recover(student, ctx, head_only=True, label=f"exit{k} head"))
        heads.append(head.eval())
    runner = DynamicEarlyExit(stages, [*heads, final])
    runner.head_reports = reports
    runner.calibrate(calib, target_fidelity)
    return runner
