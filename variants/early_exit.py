"""Early exits: truncated variants (``exit@k``) and a dynamic early-exit runner.

An exit point ``k`` is a place where a prefix of the model can stop and answer
through a small head: ResNet exit ``k`` follows ``layer{k}`` (1..3), BERT exit
``k`` follows encoder layer ``k`` (1..L-1). Family support is registered as an
:class:`ExitAdapter` (:func:`register_exit_adapter`).

``EarlyExit(at=k)`` makes a *truncated* variant: a module holding only the
prefix and its head, much smaller than the base. Its backbone is the base's
(or the pruned parent's) prefix, frozen: only the head is trained, by
distillation from the full base model (:mod:`variants.recover`), so its
tensors are identical to the parent's and a cache can share them. Heads:

- ResNet: adaptive average pool to a 2x2 grid + Linear to the classes;
- BERT encoder (``two-layers``): copies of the base's two final encoder layers,
  fine-tuned to map layer ``k``'s hidden states to the final ones. Depth
  matters: on MiniLM exit 3 (held-out token cosine, 300 steps) two layer
  copies reach 0.96 (the variant keeps 92% of the base's parameters, most of
  them the embeddings), two copies at half width (``two-half-layers``, one
  layer's weights) 0.89, one copy of the final layer 0.87, a LayerNorm +
  Linear 0.64. Where two layers would leave the variant no smaller than the
  base (exit ``L-2``), one copy of the final layer (``final-layer``); at exit
  ``L-1``, a residual LayerNorm + Linear (H -> H, starting as the identity);
- BERT classifier: the model's own pooler + classifier, fine-tuned.

:class:`DynamicEarlyExit` keeps the *whole* model plus a head at every exit
and stops per sample as soon as a head is confident enough
(:func:`build_dynamic_exit` trains the heads and calibrates the thresholds).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from variants.errors import ExportError, SpecError
from variants.prune import STRUCTURE_KEY, filter_structure  # its shape hook registers first
from variants.recover import _as_tuple, recover, task_kind
from variants.specs import EarlyExit
from variants.transforms import TransformContext, register_rebuild_hook, register_torch_transform

log = logging.getLogger(__name__)

EXIT_KEY = "exit"


# ---- modules (built lazily: importing variants must not import torch) ----------------------

@functools.lru_cache(maxsize=1)
def _modules():
    """The nn.Module classes of this file, created on first use."""
    import torch
    from torch import nn

    class PooledLinearHead(nn.Module):
        """Average-pool a feature map to ``pool x pool`` and classify: ``-> (B, classes)``.

        A 2x2 grid keeps coarse layout that early layers need (on digits, exit 1 reaches
        96% instead of 48% with global pooling) for 4x the head's weights. The pooling is
        written as slices (the windows of ``adaptive_avg_pool2d``) because the ONNX
        exporter turns ``AdaptiveAvgPool2d(2)`` into a fixed-kernel pool that only fits
        the export resolution, and the graph must serve any input size.
        """

        def __init__(self, channels: int, classes: int, pool: int = 2):
            super().__init__()
            self.grid = pool
            self.fc = nn.Linear(channels * pool * pool, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(_grid_pool(x, self.grid))

    class HiddenStateHead(nn.Module):
        """``h + W(LayerNorm(h))`` per token; W starts at zero, so the head starts as identity."""

        def __init__(self, hidden: int):
            super().__init__()
            self.norm = nn.LayerNorm(hidden)
            self.proj = nn.Linear(hidden, hidden)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

        def forward(self, h: torch.Tensor, mask: Any = None) -> torch.Tensor:
            return h + self.proj(self.norm(h))

    class LayerHead(nn.Module):
        """One BERT encoder layer as an exit head: ``(hidden, layer mask) -> hidden``."""

        def __init__(self, layer: nn.Module):
            super().__init__()
            self.layer = layer

        def forward(self, h: torch.Tensor, mask: Any = None) -> torch.Tensor:
            out = self.layer(h, mask)
            return out[0] if isinstance(out, tuple) else out

    class LayersHead(nn.Module):
        """BERT encoder layers in turn as an exit head: ``(hidden, layer mask) -> hidden``."""

        def __init__(self, layers: Sequence[nn.Module]):
            super().__init__()
            self.layers = nn.ModuleList(layers)

        def forward(self, h: torch.Tensor, mask: Any = None) -> torch.Tensor:
            for layer in self.layers:
                out = layer(h, mask)
                h = out[0] if isinstance(out, tuple) else out
            return h

    class PoolClassifyHead(nn.Module):
        """A BERT classifier's top: pooler (first token, dense, tanh), dropout, classifier."""

        def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module):
            super().__init__()
            self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

        def forward(self, h: torch.Tensor, mask: Any = None) -> torch.Tensor:
            return self.classifier(self.dropout(self.pooler(h)))

    class ResNetExit(nn.Module):
        """A torchvision ResNet cut after ``layer{at}``, with its own head (same tensor names)."""

        def __init__(self, resnet: nn.Module, at: int, head: nn.Module):
            super().__init__()
            self.conv1, self.bn1 = resnet.conv1, resnet.bn1
            self.relu, self.maxpool = resnet.relu, resnet.maxpool
            self.at = at
            for i in range(1, at + 1):
                setattr(self, f"layer{i}", getattr(resnet, f"layer{i}"))
            self.head = head

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for i in range(1, self.at + 1):
                x = getattr(self, f"layer{i}")(x)
            return x

        def forward_head(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x)

        def head_parameters(self):
            return self.head.parameters()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(x))

    class BertEncoderExit(nn.Module):
        """A truncated BERT encoder plus a head mimicking the final hidden states."""

        def __init__(self, bert: nn.Module, head: nn.Module):
            super().__init__()
            self.bert, self.head = bert, head

        def forward_features(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return h, _bert_layer_mask(self.bert, attention_mask, h)

        def forward_head(self, h, mask=None):
            return self.head(h, mask)

        def head_parameters(self):
            return self.head.parameters()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.forward_head(*self.forward_features(input_ids, attention_mask))

    class BertClassifierExit(nn.Module):
        """A truncated ``BertForSequenceClassification``; its pooler + classifier is the head."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward_features(self, input_ids, attention_mask):
            return self.model.bert(input_ids=input_ids,
                                   attention_mask=attention_mask).last_hidden_state

        def forward_head(self, h):
            return self.model.classifier(self.model.dropout(self.model.bert.pooler(h)))

        def head_parameters(self):
            return [*self.model.bert.pooler.parameters(), *self.model.classifier.parameters()]

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(input_ids, attention_mask))

    class Chain(nn.Module):
        """Run modules in turn, passing a tuple state (the dynamic runner's segments)."""

        def __init__(self, *parts: nn.Module):
            super().__init__()
            self.parts = nn.ModuleList(parts)

        def forward(self, *state):
            for part in self.parts:
                state = _as_tuple(part(*state))
            return state[0] if len(state) == 1 else state

    class BertStem(nn.Module):
        """Embeddings and the attention mask in the form the encoder layers take."""

        def __init__(self, bert: nn.Module):
            super().__init__()
            self.embeddings = bert.embeddings
            self._mask = functools.partial(_bert_layer_mask, bert)

        def forward(self, input_ids, attention_mask):
            h = self.embeddings(input_ids=input_ids)
            return h, self._mask(attention_mask, h)

    class BertBlock(nn.Module):
        """One encoder layer on ``(hidden, mask)`` state."""

        def __init__(self, layer: nn.Module):
            super().__init__()
            self.layer = layer

        def forward(self, h, mask=None):
            out = self.layer(h, mask)
            return (out[0] if isinstance(out, tuple) else out), mask

    class TakeHidden(nn.Module):
        def forward(self, h, mask=None):
            return h

    class StagedExit(nn.Module):
        """Prefix of the dynamic runner's stages plus one exit head (for head training)."""

        def __init__(self, stages: Sequence[nn.Module], head: nn.Module):
            super().__init__()
            self.stages, self.head = nn.ModuleList(stages), head

        def forward_features(self, *inputs):
            state = inputs
            for stage in self.stages:
                state = _as_tuple(stage(*state))
            return state

        def forward_head(self, *state):
            return self.head(*state)

        def head_parameters(self):
            return self.head.parameters()

        def forward(self, *inputs):
            return self.forward_head(*self.forward_features(*inputs))

    return _Namespace(locals())


def _grid_pool(x, grid: int):
    """``adaptive_avg_pool2d(x, grid).flatten(1)`` from slices, so export keeps H, W dynamic."""
    import torch

    h, w = x.shape[-2:]
    cells = []
    for i in range(grid):
        rows = x[..., (i * h) // grid:-((-(i + 1) * h) // grid), :]
        for j in range(grid):
            cells.append(rows[..., (j * w) // grid:-((-(j + 1) * w) // grid)].mean((-2, -1)))
    return torch.stack(cells, -1).flatten(1)


class _Namespace:
    def __init__(self, items: dict[str, Any]):
        self.__dict__.update({k: v for k, v in items.items() if isinstance(v, type)})


def _narrow_bert_layer(layer, keep: float = 0.5):
    """A copy of a BERT encoder layer with the ``keep`` fraction of its attention heads and
    FFN neurons, those with the largest weight norms (in and out). Only the shapes matter
    when a stored variant is rebuilt (its weights are loaded over them)."""
    import torch
    from torch import nn

    layer = copy.deepcopy(layer)
    att, att_out = layer.attention.self, layer.attention.output.dense
    inter, ffn_out = layer.intermediate.dense, layer.output.dense

    def rows(lin, idx):
        new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None)
        with torch.no_grad():
            new.weight.copy_(lin.weight[idx])
            if lin.bias is not None:
                new.bias.copy_(lin.bias[idx])
        return new

    def cols(lin, idx):
        new = nn.Linear(len(idx), lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            new.weight.copy_(lin.weight[:, idx])
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        return new

    def top(score, k):
        return torch.sort(torch.topk(score, k).indices).values

    d, n = att.attention_head_size, att.num_attention_heads
    with torch.no_grad():
        per_head = sum(lin.weight.pow(2).sum(1) for lin in (att.query, att.key, att.value)) + \
            att_out.weight.pow(2).sum(0)
        heads = top(per_head.view(n, d).sum(1), max(1, round(n * keep)))
        idx = (heads[:, None] * d + torch.arange(d)).flatten()
        neurons = top(inter.weight.pow(2).sum(1) + ffn_out.weight.pow(2).sum(0),
                      max(1, round(inter.out_features * keep)))
    att.query, att.key, att.value = (rows(lin, idx) for lin in (att.query, att.key, att.value))
    att.num_attention_heads, att.all_head_size = len(heads), len(idx)
    layer.attention.output.dense = cols(att_out, idx)
    layer.intermediate.dense = rows(inter, neurons)
    layer.output.dense = cols(ffn_out, neurons)
    return layer


def _bert_layer_mask(bert, attention_mask, h):
    """The mask BERT's layers expect (transformers 5 builds it in ``_create_attention_masks``)."""
    if hasattr(bert, "_create_attention_masks"):
        return bert._create_attention_masks(attention_mask=attention_mask,
                                            encoder_attention_mask=None, embedding_output=h,
                                            encoder_hidden_states=None, cache=None)[0]
    return bert.get_extended_attention_mask(attention_mask, attention_mask.shape)  # transformers 4


# ---- family adapters -----------------------------------------------------------------------

class ExitAdapter(ABC):
    """How one family truncates, rebuilds and splits into stages at its exit points."""

    family: ClassVar[str]

    @abstractmethod
    def truncate(self, module, arch: dict, at: int) -> tuple[Any, dict]:
        """The exit-``at`` variant of ``module`` (changed in place) and its arch."""

    @abstractmethod
    def rebuild(self, module, arch: dict):
        """Turn the rebuilt base structure into the stored exit variant's structure."""

    @abstractmethod
    def stages(self, module, arch: dict) -> tuple[list, Any]:
        """The model as consecutive stages (exit ``k`` follows stage ``k``) and its final head.

        Stages and final head share ``module``'s submodules (no copies).
        """

    @abstractmethod
    def new_head(self, module, arch: dict, at: int):
        """An untrained exit head for the state after stage ``at``."""


_ADAPTERS: dict[str, ExitAdapter] = {}


def register_exit_adapter(cls: type[ExitAdapter]) -> type[ExitAdapter]:
    """Class decorator: early-exit support for ``cls.family`` (and its rebuild hook)."""
    adapter = cls()
    _ADAPTERS[cls.family] = adapter
    register_rebuild_hook(cls.family, EXIT_KEY)(adapter.rebuild)
    return cls


def list_exit_families() -> list[str]:
    return sorted(_ADAPTERS)


def exit_adapter(family: str) -> ExitAdapter:
    try:
        return _ADAPTERS[family]
    except KeyError:
        raise SpecError(f"early exit is not implemented for family {family!r}; families with "
                        f"exit points: {', '.join(list_exit_families())}") from None


@register_exit_adapter
class ResNetExits(ExitAdapter):
    family = "resnet"

    @staticmethod
    def _channels(module, at: int) -> int:
        from torch import nn

        bns = [m for m in getattr(module, f"layer{at}").modules() if isinstance(m, nn.BatchNorm2d)]
        return bns[-1].num_features

    #: side of the pooled grid the exit heads classify from
    pool = 2

    def new_head(self, module, arch, at):
        return _modules().PooledLinearHead(self._channels(module, at), module.fc.out_features,
                                           self.pool)

    def truncate(self, module, arch, at):
        arch = {**arch, EXIT_KEY: {"at": at, "head": "pooled-linear",
                                   "channels": self._channels(module, at), "pool": self.pool,
                                   "classes": module.fc.out_features}}
        return self.rebuild(module, arch), arch

    def rebuild(self, module, arch):
        spec = arch[EXIT_KEY]
        head = _modules().PooledLinearHead(spec["channels"], spec["classes"], spec["pool"])
        return _modules().ResNetExit(module, spec["at"], head)

    def stages(self, module, arch):
        from torch import nn

        stem = nn.Sequential(module.conv1, module.bn1, module.relu, module.maxpool, module.layer1)
        final = nn.Sequential(module.avgpool, nn.Flatten(1), module.fc)
        return [stem, module.layer2, module.layer3, module.layer4], final


@register_exit_adapter
class BertExits(ExitAdapter):
    family = "bert"

    @staticmethod
    def _inner(module):
        return module.bert if hasattr(module, "bert") else module.model.bert

    def new_head(self, module, arch, at):
        M = _modules()
        if hasattr(module, "model"):  # classifier: a copy of its own pooler + classifier
            m = module.model
            return M.PoolClassifyHead(copy.deepcopy(m.bert.pooler), copy.deepcopy(m.dropout),
                                      copy.deepcopy(m.classifier))
        return self._encoder_head(self._encoder_head_kind(arch, at), self._inner(module))

    @staticmethod
    def _encoder_head_kind(arch, at: int) -> str:
        """The deepest head that still leaves the variant smaller than the base: two layers,
        else one, else a residual linear map."""
        layers = arch["config"]["num_hidden_layers"]
        return "two-layers" if at <= layers - 3 else "final-layer" if at <= layers - 2 else \
            "residual-linear"

    @staticmethod
    def _encoder_head(kind: str, bert):
        """The head of ``kind``, made from ``bert``'s last layers: at truncation the base's
        final layers (their weights are the head's starting point); at rebuild the kept
        prefix's, which have the same shapes because pruning is uniform per layer (the
        shape hook has reshaped the backbone by then) and whose weights are replaced by the
        stored ones. ``two-half-layers`` (one layer's weights, MiniLM exit 3: 0.89) is not
        chosen by default but builds and rebuilds like the others."""
        M = _modules()
        layers = list(bert.encoder.layer)
        last_two = layers[-2:] if len(layers) >= 2 else layers * 2
        makers = {
            "two-layers": lambda: M.LayersHead([copy.deepcopy(x) for x in last_two]),
            "two-half-layers": lambda: M.LayersHead([_narrow_bert_layer(x) for x in last_two]),
            "final-layer": lambda: M.LayerHead(copy.deepcopy(layers[-1])),
            "residual-linear": lambda: M.HiddenStateHead(bert.config.hidden_size)}
        return makers[kind]()

    def truncate(self, module, arch, at):
        from torch import nn

        bert = self._inner(module)
        head = self.new_head(module, arch, at)  # before the cut: copies the final layer
        kind = "pooler-classifier" if hasattr(module, "model") else \
            self._encoder_head_kind(arch, at)
        bert.encoder.layer = nn.ModuleList(list(bert.encoder.layer)[:at])
        bert.config.num_hidden_layers = at
        arch = {**arch, "config": {**arch["config"], "num_hidden_layers": at},
                EXIT_KEY: {"at": at, "head": kind}}
        if hasattr(module, "model"):
            return _modules().BertClassifierExit(module.model), arch
        return _modules().BertEncoderExit(bert, head), arch

    def rebuild(self, module, arch):
        """Wrap the ``at``-layer model that ``rebuild`` built from the config."""
        M = _modules()
        if hasattr(module, "model"):
            return M.BertClassifierExit(module.model)
        head = self._encoder_head(arch[EXIT_KEY]["head"], module.bert)
        return M.BertEncoderExit(module.bert, head)

    def stages(self, module, arch):
        M = _modules()
        bert = self._inner(module)
        blocks = [M.BertBlock(layer) for layer in bert.encoder.layer]
        stages = [M.Chain(M.BertStem(bert), blocks[0]), *blocks[1:]]
        if hasattr(module, "model"):
            m = module.model
            return stages, M.PoolClassifyHead(m.bert.pooler, m.dropout, m.classifier)
        return stages, M.TakeHidden()


# ---- the EarlyExit transform ---------------------------------------------------------------

def check_exit(family, arch: dict, at: int) -> ExitAdapter:
    """Validate exit point ``at`` for this model (SpecError names the valid range)."""
    family.check_exit(arch, at)
    return exit_adapter(family.name)


@register_torch_transform(EarlyExit)
def early_exit_module(module, spec: EarlyExit, arch: dict, ctx: TransformContext):
    """The ``EarlyExit`` transform: truncate after exit ``at``, train the head (backbone frozen)."""
    adapter = check_exit(ctx.family, arch, spec.at)
    n_parent = _count(module)
    exit_mod, arch = adapter.truncate(module, arch, spec.at)
    if STRUCTURE_KEY in arch:  # a pruned parent: keep only the record of what is left
        arch = {**arch, STRUCTURE_KEY: filter_structure(arch[STRUCTURE_KEY], exit_mod)}
    n = _count(exit_mod)
    ctx.report.update({"params_base": _count(ctx.base), "params_parent": n_parent,
                       "params_ratio": round(n / max(_count(ctx.base), 1), 6)})
    ctx.report.update(recover(exit_mod, ctx, head_only=True, label=f"exit{spec.at} head"))
    return exit_mod.eval(), arch


def _count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ---- dynamic early exit --------------------------------------------------------------------

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
        from variants.backends import open_onnx

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
    from variants.families import get_family

    fam = get_family(family) if isinstance(family, str) else family
    if task_kind(fam, arch) != "classification":
        raise SpecError(f"dynamic early exit stops on softmax confidence, so it needs a "
                        f"classifier; {arch.get('model')!r} outputs hidden states (use a "
                        f"truncated exit variant, EarlyExit(k), instead)")
    adapter = exit_adapter(fam.name)
    module = module.eval()
    stages, final = adapter.stages(module, arch)
    ctx = TransformContext(family=fam, base=module, base_arch=arch, calib=calib, seed=seed,
                           recover_steps=steps, progress=progress)
    M = _modules()
    heads, reports = [], []
    for k in range(1, len(stages)):
        head = adapter.new_head(module, arch, k)
        student = M.StagedExit(stages[:k], head)
        reports.append(recover(student, ctx, head_only=True, label=f"exit{k} head"))
        heads.append(head.eval())
    runner = DynamicEarlyExit(stages, [*heads, final])
    runner.head_reports = reports
    runner.calibrate(calib, target_fidelity)
    return runner
