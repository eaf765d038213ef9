"""Accuracy recovery by knowledge distillation from the untransformed base model.

Pruned and truncated models lose accuracy badly, and a variant store rarely
has labels for the user's task, so recovery pulls the student back toward its
teacher (``ctx.base``) on unlabelled data: KL divergence on temperature-softened
logits for classifiers, MSE plus cosine distance on hidden states for
encoders. Fidelity to the teacher (top-1 agreement, or mean token cosine) is
measured on *held-out* data before and after, and written into the variant's
manifest, so the cache can see what each variant costs in accuracy.

Data: when the calibration source is a data set (``digits``, ``text``, a user
file) the student trains on its ``train`` split and is measured on ``eval``;
with ``random`` calibration it trains on the calibration batches and is
measured on fresh random inputs. Teacher outputs are computed once per data
split and reused by every variant of the same base (they never change).

Pruned transformer encoders (BERT-shaped students with the teacher's depth) are
first *reconstructed* in closed form (:func:`reconstruct`): layer by layer, the
attention-output and FFN-output projections are refitted by ridge regression so
the kept heads and neurons reproduce the teacher's pre-LayerNorm sums on the
student's own inputs (MiniLM prune0.5: token cosine 0.56 -> 0.80 in seconds,
before any gradient step); distillation starts from there.

Head-only recovery (early exits) trains just the exit head on cached
backbone features, so the backbone's tensors stay identical to the base's and
a cache can hold them once.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from variants.data import Dataset, load_data
from variants.errors import DataError
from variants.registry import Registry
from variants.transforms import TransformContext

log = logging.getLogger(__name__)

#: cap on held-out samples: enough for a stable fidelity number, cheap to evaluate
HELD_OUT_SAMPLES = 512
_RANDOM_HELD_OUT_BATCHES = 4


@dataclass(frozen=True)
class RecoveryConfig:
    """How a family recovers: default step count, batch size, learning rates.

    ``steps`` (``head_steps`` for exit heads, if set) applies when the user gives no
    ``recover_steps``; ``head_lr`` is used when only a freshly initialised exit head
    trains (it can move faster than pretrained weights without breaking them).
    """

    steps: int = 100
    #: steps of head-only recovery (early exits), when they need fewer; None: ``steps``
    head_steps: int | None = None
    batch: int = 32
    lr: float = 1e-3
    head_lr: float = 3e-3
    temperature: float = 4.0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    #: training batches for the least-squares refit of pruned transformer layers before
    #: distillation (:func:`reconstruct`; 0: none, and families it does not fit skip it)
    reconstruct_batches: int = 16

    def __post_init__(self) -> None:
        if min(self.steps, self.head_steps or 0) < 0 or self.batch < 1 or self.lr <= 0 or \
                self.head_lr <= 0:
            raise ValueError(f"bad recovery config {self}")


_DEFAULTS: Registry[RecoveryConfig] = Registry("recovery defaults")


def register_recovery_defaults(family: str, config: RecoveryConfig, *,
                               replace: bool = False) -> None:
    """Set the recovery defaults of a family (others use ``RecoveryConfig()``)."""
    _DEFAULTS.register(family, config, replace=replace)


def recovery_defaults(family: str) -> RecoveryConfig:
    return _DEFAULTS.find(family, RecoveryConfig())


# Measured on 2 cores: ResNet-18 on digits at 32x32, 300 steps of 64 images (16 epochs of
# the train split) take 35 s once pruned and bring prune0.5 back to 99% of base accuracy;
# exit heads train on cached features in seconds. MiniLM prune0.5 (held-out token cosine,
# 300 steps of 32 texts, about 2 minutes unloaded): on the former 1.8k-sentence corpus 0.79 at lr
# 1e-4, 0.84 at 3e-4, 0.86 at 1e-3; on the 8.4k-sentence corpus 0.856 at 3e-4; with the
# least-squares reconstruction first (0.56 -> 0.80) 0.867 at 3e-4 and 0.874 at 1e-3, then
# at 1e-3 0.890 in 600 steps (2.5 min unloaded), 0.899 in 1000 (5 min) and 0.9035 in 1400
# (6.8 min): a variant is made once and served for long, so the default buys the last
# points. Exit heads (two layer copies, MiniLM exit3) reach 0.96 in 300 steps: they keep 300.
register_recovery_defaults("resnet", RecoveryConfig(steps=300, batch=64, lr=1e-3, head_lr=1e-2))
register_recovery_defaults("bert", RecoveryConfig(steps=1400, head_steps=300, batch=32, lr=1e-3,
                                                  head_lr=1e-3, weight_decay=0.01))


# ---- objectives: how a student is pulled toward, and compared with, its teacher -------------

@dataclass(frozen=True)
class Objective:
    """Distillation loss and fidelity measure of one kind of model output."""

    metric: str
    #: loss(student_out, teacher_out, token_mask, temperature) -> scalar tensor
    loss: Callable[..., Any]
    #: score(student_out, teacher_out, token_mask) -> (sum of per-item scores, item count)
    score: Callable[..., tuple[float, int]]


def _rows(y, mask):
    """Outputs as (items, features): valid tokens of (B, T, H), else one row per sample."""
    if y.ndim == 3 and mask is not None:
        return y[mask.bool()]
    return y.reshape(len(y), -1)


def _kl_loss(s, t, mask, temperature):
    import torch.nn.functional as F

    T = temperature
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * T * T


def _agreement(s, t, mask):
    return float((s.argmax(-1) == t.argmax(-1)).sum()), len(s)


def _hidden_loss(s, t, mask, temperature):
    import torch.nn.functional as F

    rs, rt = _rows(s, mask), _rows(t, mask)
    # MSE relative to the teacher's scale, so one lr fits encoders of any width or norm
    mse = F.mse_loss(rs, rt) / rt.pow(2).mean().clamp_min(1e-8)
    return mse + (1 - F.cosine_similarity(rs, rt, dim=-1)).mean()


def _cosine(s, t, mask):
    import torch.nn.functional as F

    rs, rt = _rows(s, mask).double(), _rows(t, mask).double()
    return float(F.cosine_similarity(rs, rt, dim=-1).sum()), len(rs)


_OBJECTIVES: dict[str, Objective] = {
    "classification": Objective("top1_agreement", _kl_loss, _agreement),
    "embedding": Objective("cosine", _hidden_loss, _cosine),
}


def task_kind(family, arch: dict[str, Any]) -> str:
    """``classification`` when the model outputs logits, else ``embedding``."""
    return "classification" if family.output_names(arch) == ["logits"] else "embedding"


# ---- data: inputs with their teacher outputs, cached per teacher ----------------------------

@dataclass
class Batch:
    """Model inputs, the teacher's output on them, a token mask and optional labels."""

    inputs: tuple[Any, ...]
    target: Any
    mask: Any = None
    labels: np.ndarray | None = None


#: teacher module -> {(source, split, batch, seed): [Batch]}; a base never changes while cached
_TEACHER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_dataset(source: str | None) -> bool:
    return bool(source) and source != "random"


def _token_mask_index(family, arch) -> int | None:
    names = [s.name for s in family.inputs(arch)]
    return names.index("attention_mask") if "attention_mask" in names else None


def _with_teacher(teacher, ctx: TransformContext, raw: Iterable[tuple[tuple, Any]]) -> list[Batch]:
    import torch

    mask_at = _token_mask_index(ctx.family, ctx.base_arch)
    out = []
    teacher.eval()
    with torch.no_grad():
        for inputs, labels in raw:
            inputs = tuple(inputs)
            target = teacher(*inputs).float()
            mask = inputs[mask_at] if mask_at is not None and target.ndim == 3 else None
            out.append(Batch(inputs, target, mask, labels))
    return out


def _raw_batches(ctx: TransformContext, split: str, batch: int):
    """(model inputs, labels) for ``split``: data-set splits, else calibration/random inputs."""
    source = getattr(ctx.calib, "source", None)
    fam, arch = ctx.family, ctx.base_arch
    if _is_dataset(source):
        ds = load_data(source, split)
        if split == "eval":
            ds = ds.take(HELD_OUT_SAMPLES)
        return [(fam.data_inputs(arch, x), y) for x, y in _by_length(ds).batches(batch)]
    if split == "eval" and source == "random":
        return [(fam.example_inputs(arch, batch, seed=ctx.seed + 10_000 + i), None)
                for i in range(_RANDOM_HELD_OUT_BATCHES)]
    return [(tuple(b), None) for b in ctx.calib]


def _by_length(ds: Dataset) -> Dataset:
    """Texts sorted by length, so a batch pads to similar lengths (about 2x fewer tokens)."""
    if not len(ds) or not isinstance(ds.inputs[0], str):
        return ds
    order = sorted(range(len(ds)), key=lambda i: len(ds.inputs[i]))
    labels = None if ds.labels is None else ds.labels[order]
    return Dataset(ds.name, [ds.inputs[i] for i in order], labels)


def teacher_batches(ctx: TransformContext, split: str, batch: int) -> list[Batch]:
    """Batches of ``split`` ("train", "calib" or "eval") with the teacher's outputs (cached)."""
    source = getattr(ctx.calib, "source", None)
    if _is_dataset(source) and split != "calib":
        key: tuple = (source, split, batch, ctx.seed)
        anchor = None
    else:  # derived from this calibration object: valid only while it is the same object
        key, anchor = (split, batch, ctx.seed, id(ctx.calib)), ctx.calib
    per_teacher = _TEACHER_CACHE.setdefault(ctx.base, {})
    hit = per_teacher.get(key)
    if hit is None or hit[0] is not anchor:
        raw = [(tuple(b), None) for b in ctx.calib] if split == "calib" else \
            _raw_batches(ctx, split, batch)
        hit = per_teacher[key] = (anchor, _with_teacher(ctx.base, ctx, raw))
    return hit[1]


def data_description(ctx: TransformContext, split: str) -> str:
    source = getattr(ctx.calib, "source", None)
    if _is_dataset(source):
        return f"{source}:{split}"
    if split == "eval" and source == "random":
        return "random (fresh seeds)"
    return "calibration batches"


# ---- measuring -------------------------------------------------------------------------------

def measure(student, batches: list[Batch], objective: Objective) -> dict[str, float]:
    """Fidelity of ``student`` to the teacher outputs in ``batches`` (and accuracy if labelled)."""
    import torch

    student.eval()
    total, count, correct, labelled = 0.0, 0, 0, 0
    with torch.no_grad():
        for b in batches:
            out = student(*b.inputs).float()
            s, n = objective.score(out, b.target, b.mask)
            total, count = total + s, count + n
            if _has_class_labels(b, out):
                correct += int((out.argmax(-1).numpy() == b.labels).sum())
                labelled += len(b.labels)
    result = {"fidelity": total / max(count, 1)}
    if labelled:
        result["accuracy"] = correct / labelled
    return result


def _has_class_labels(b: Batch, out) -> bool:
    """Labels count only when they index the model's classes exactly (a digits model on digits)."""
    return b.labels is not None and out.ndim == 2 and int(np.max(b.labels)) + 1 == out.shape[-1]


def teacher_accuracy(batches: list[Batch]) -> float | None:
    correct = sum(int((b.target.argmax(-1).numpy() == b.labels).sum())
                  for b in batches if _has_class_labels(b, b.target))
    n = sum(len(b.labels) for b in batches if _has_class_labels(b, b.target))
    return correct / n if n else None


# ---- training --------------------------------------------------------------------------------

class _Trainable:
    """Make exactly ``params`` trainable for the duration; restore requires_grad after."""

    def __init__(self, module, params):
        self._module, self._params = module, list(params)

    def __enter__(self):
        self._saved = [(p, p.requires_grad) for p in self._module.parameters()]
        for p in self._module.parameters():
            p.requires_grad_(False)
        for p in self._params:
            p.requires_grad_(True)
        return self._params

    def __exit__(self, *exc):
        for p, flag in self._saved:
            p.requires_grad_(flag)
        return False


def _as_tuple(x) -> tuple:
    """Stage outputs may be one tensor or a tuple (hidden states with their mask)."""
    return x if isinstance(x, tuple) else (x,)


def _train_norm_only(student) -> None:
    """Train mode for batch norms only: their statistics must follow the pruned channels,
    but dropout would only blur the teacher signal the student is fitting."""
    from torch import nn

    student.eval()
    for m in student.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


def _warmup_cosine(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first tenth, then cosine decay to 0."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def distill(student, batches: list[Batch], objective: Objective, config: RecoveryConfig,
            steps: int, *, head_only: bool = False, seed: int = 0,
            tick: Callable[[int, int], None] | None = None) -> None:
    """Train ``student`` toward the teacher outputs in ``batches`` for ``steps`` steps.

    With ``head_only`` the student must offer ``forward_features``, ``forward_head``
    and ``head_parameters`` (the early-exit modules do): features are computed once
    in eval mode and only the head learns.
    """
    import torch

    if head_only:
        student.eval()
        with torch.no_grad():
            feats = [_as_tuple(student.forward_features(*b.inputs)) for b in batches]
        params, lr = list(student.head_parameters()), config.head_lr
        forward = lambda i: student.forward_head(*feats[i])  # noqa: E731
    else:
        _train_norm_only(student)
        params, lr = list(student.parameters()), config.lr
        forward = lambda i: student(*batches[i].inputs)  # noqa: E731
    rng = np.random.default_rng(seed)
    with _Trainable(student, params):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup_cosine,
                                                                     steps=steps))
        order: list[int] = []
        for step in range(steps):
            if not order:
                order = list(rng.permutation(len(batches)))
            i = order.pop()
            loss = objective.loss(forward(i).float(), batches[i].target, batches[i].mask,
                                  config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            opt.step()
            sched.step()
            if tick:
                tick(step + 1, steps)
    student.eval()


def recover(student, ctx: TransformContext, *, head_only: bool = False,
            label: str = "recover", config: RecoveryConfig | None = None) -> dict[str, Any]:
    """Distil ``student`` from ``ctx.base`` in place; return the metrics for the manifest.

    ``ctx.recover_steps`` overrides the family's default step count; ``0`` skips
    training (fidelity is still measured). If training makes the student *less*
    faithful on the calibration batches (too few steps, too high a rate), the
    pre-training weights are kept and ``recover_reverted`` says so.
    """
    config = config or recovery_defaults(ctx.family.name)
    default = config.head_steps if head_only and config.head_steps is not None else config.steps
    steps = default if ctx.recover_steps is None else int(ctx.recover_steps)
    if steps < 0:
        raise DataError(f"recover_steps must be >= 0, got {steps}")
    objective = _OBJECTIVES[task_kind(ctx.family, ctx.base_arch)]
    held_out = teacher_batches(ctx, "eval", config.batch)
    before = measure(student, held_out, objective)
    report: dict[str, Any] = {"fidelity_metric": objective.metric,
                              "fidelity_data": data_description(ctx, "eval"),
                              "fidelity_before": round(before["fidelity"], 6),
                              "recover_steps": steps,
                              "recover_mode": "head" if head_only else "full"}
    t0 = time.perf_counter()
    if steps > 0 and not head_only and config.reconstruct_batches > 0 and \
            _token_mask_index(ctx.family, ctx.base_arch) is not None and \
            reconstructable(student, ctx.base):
        train = teacher_batches(ctx, "train", config.batch)
        every = max(1, len(train) // config.reconstruct_batches)  # short and long texts alike
        reconstruct(student, ctx.base, train[::every][:config.reconstruct_batches],
                    _token_mask_index(ctx.family, ctx.base_arch))
        report["fidelity_reconstructed"] = round(measure(student, held_out,
                                                         objective)["fidelity"], 6)
        log.info("%s: %s %.4f after least-squares reconstruction", label, objective.metric,
                 report["fidelity_reconstructed"])
    if steps > 0:
        reverted = _train_and_keep_better(student, ctx, objective, config, steps, head_only,
                                          label)
        report["recover_data"] = data_description(ctx, "train")
        report["recover_reverted"] = reverted
    after = measure(student, held_out, objective) if steps > 0 else before
    report["fidelity_after"] = round(after["fidelity"], 6)
    report["recover_seconds"] = round(time.perf_counter() - t0, 2)
    if "accuracy" in before:
        report["accuracy_base"] = round(teacher_accuracy(held_out) or 0.0, 6)
        report["accuracy_before"] = round(before["accuracy"], 6)
        report["accuracy_after"] = round(after["accuracy"], 6)
    log.info("%s: %s %.4f -> %.4f in %d steps (%.1fs)", label, objective.metric,
             before["fidelity"], after["fidelity"], steps, report["recover_seconds"])
    return report


def _train_and_keep_better(student, ctx, objective, config, steps, head_only, label) -> bool:
    check = teacher_batches(ctx, "calib", config.batch)
    start = measure(student, check, objective)["fidelity"]
    saved = copy.deepcopy(student.state_dict())
    train = teacher_batches(ctx, "train", config.batch)
    distill(student, train, objective, config, steps, head_only=head_only,
            seed=ctx.seed, tick=lambda done, total: ctx.tick(label, done, total))
    end = measure(student, check, objective)["fidelity"]
    reverted = end < start
    if reverted:
        log.warning("%s: recovery lowered calibration fidelity %.4f -> %.4f; keeping the "
                    "unrecovered weights", label, start, end)
        student.load_state_dict(saved)
    return reverted


# ---- least-squares reconstruction of pruned transformer layers --------------------------------

class _Stop(Exception):
    """Raised by a hook once the layer being refitted has given its inputs."""


def _encoder_layers(module):
    """The encoder layers of a BERT-shaped module (its ``bert`` or ``model.bert``), else None."""
    for path in (("bert",), ("model", "bert"), ()):
        obj = module
        for name in path:
            obj = getattr(obj, name, None)
        layers = getattr(getattr(obj, "encoder", None), "layer", None)
        if layers is not None:
            return list(layers)
    return None


def _sites(layer) -> list[tuple[Any, Any]]:
    """(output projection, the LayerNorm after it) of a BERT layer's attention and FFN."""
    return [(layer.attention.output.dense, layer.attention.output.LayerNorm),
            (layer.output.dense, layer.output.LayerNorm)]


def reconstructable(student, teacher) -> bool:
    """BERT-shaped student and teacher with the same depth, the student narrower somewhere."""
    s, t = _encoder_layers(student), _encoder_layers(teacher)
    try:
        pairs = [(a, b) for ls, lt in zip(s or [], t or []) for a, b in zip(_sites(ls), _sites(lt))]
    except AttributeError:
        return False
    return bool(s) and len(s) == len(t) and \
        all(a[0].out_features == b[0].out_features for a, b in pairs) and \
        any(a[0].in_features != b[0].in_features for a, b in pairs)


def reconstruct(student, teacher, batches: list[Batch], mask_at: int, ridge: float = 1e-3) -> None:
    """Refit, layer by layer, each output projection of a pruned BERT (attention output and
    FFN output Linear) by ridge regression so that, on the student's *own* inputs, the sum
    entering the following LayerNorm matches the teacher's. The kept heads and neurons
    stay; only how they are mixed back into the hidden size changes. Closed form, a few
    seconds, and it starts distillation much closer to the teacher."""
    import torch

    s_layers, t_layers = _encoder_layers(student), _encoder_layers(teacher)
    masks = [b.inputs[mask_at].bool() for b in batches]
    # the teacher's pre-LayerNorm sums at every site, valid tokens only (they never change)
    t_sums: dict[tuple[int, int], list] = {}
    hooks = []
    for i, layer in enumerate(t_layers):
        for j, (_, norm) in enumerate(_sites(layer)):
            hooks.append(norm.register_forward_hook(
                lambda m, inp, out, k=(i, j): t_sums.setdefault(k, []).append(inp[0])))
    teacher.eval()
    try:
        with torch.no_grad():
            for b in batches:
                teacher(*b.inputs)
    finally:
        for h in hooks:
            h.remove()
    t_sums = {k: [x[m] for x, m in zip(v, masks)] for k, v in t_sums.items()}
    student.eval()
    for i, layer in enumerate(s_layers):
        for j, (dense, norm) in enumerate(_sites(layer)):
            d_in = dense.in_features + 1
            xtx = torch.zeros(d_in, d_in, dtype=torch.float64)
            xty = torch.zeros(d_in, dense.out_features, dtype=torch.float64)
            for n, (x, y, z) in enumerate(_site_values(student, dense, norm, batches, masks)):
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                # the projection's target: the teacher's sum minus the student's residual
                target = t_sums[(i, j)][n].double() - (z - y)
                xtx += x.T @ x
                xty += x.T @ target
            lam = ridge * float(torch.diagonal(xtx).mean())
            w = torch.linalg.solve(xtx + lam * torch.eye(d_in, dtype=xtx.dtype), xty)
            with torch.no_grad():
                dense.weight.copy_(w[:-1].T.to(dense.weight.dtype))
                dense.bias.copy_(w[-1].to(dense.bias.dtype))


def _site_values(student, dense, norm, batches: list[Batch], masks: list):
    """Per batch, on valid tokens (float64): the input and output of ``dense`` and the sum
    entering ``norm``; the forward pass stops there."""
    import contextlib

    import torch

    seen: dict[str, Any] = {}

    def grab_in(module, inp, out):
        seen["x"], seen["y"] = inp[0], out

    def grab_sum(module, inp, out):
        seen["z"] = inp[0]
        raise _Stop

    hooks = [dense.register_forward_hook(grab_in), norm.register_forward_hook(grab_sum)]
    try:
        with torch.no_grad():
            for b, m in zip(batches, masks):
                with contextlib.suppress(_Stop):
                    student(*b.inputs)
                yield tuple(seen[k][m].double() for k in ("x", "y", "z"))
    finally:
        for h in hooks:
            h.remove()
