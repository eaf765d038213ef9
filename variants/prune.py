"""Structured pruning with torch-pruning, and the shape-driven rebuild of pruned models.

``Prune(ratio)`` removes that fraction of channels per layer (parameters
shrink by about ``1 - (1 - ratio)**2``), then recovers accuracy by
distillation from the base (:mod:`variants.recover`). Family pruners are
registered by family name (:func:`register_pruner`):

- ``resnet``: every conv channel group by L2 group magnitude, the classifier
  kept whole, channel counts rounded to multiples of 8 for fast kernels;
- ``bert``: whole attention heads and FFN width, the same count in every
  layer so the transformers config can still describe the model (hidden size
  and embeddings are kept);
- anything else (the ``custom`` family): the same as ``resnet`` with the last
  Linear (else the last conv) kept, so the output shape cannot change.

A pruned module is stored as plain safetensors. To load them, ``rebuild``
needs the pruned shapes: the transform records, under ``arch["pruned"]``,
every tensor whose shape changed (``shapes``: state-dict name -> shape) and
the numeric attributes of every module that changed (``attrs``: module name ->
{attr: value}, e.g. ``in_channels``, ``num_attention_heads``). One generic
rebuild hook applies that record to the freshly built base structure, so no
family needs its own rebuild code (and no pickle is ever loaded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from variants.errors import SpecError
from variants.recover import recover
from variants.registry import Registry
from variants.specs import Prune
from variants.transforms import TransformContext, register_rebuild_hook, register_torch_transform

log = logging.getLogger(__name__)

STRUCTURE_KEY = "pruned"
#: channel counts become multiples of this (vectorised kernels like multiples of 8)
ROUND_TO = 8

#: fn(module, ratio, arch, ctx) -> arch: prune ``module`` in place, return the updated arch
Pruner = Callable[[Any, float, dict, TransformContext], dict]
_PRUNERS: Registry[Pruner] = Registry("pruner")


def register_pruner(family: str):
    """Decorator: the pruner used for ``family`` (others get :func:`prune_generic`)."""
    return _PRUNERS.register(family)


def list_pruners() -> list[str]:
    return _PRUNERS.names()


@register_torch_transform(Prune)
def prune_module(module, spec: Prune, arch: dict, ctx: TransformContext):
    """The ``Prune`` transform: prune, record the new structure, recover by distillation."""
    before = snapshot(module)
    n_before = _count(module)
    for p in module.parameters():  # torch-pruning traces the graph through autograd
        p.requires_grad_(True)
    pruner = _PRUNERS.find(ctx.family.name, prune_generic)
    arch = pruner(module, spec.ratio, arch, ctx)
    arch[STRUCTURE_KEY] = structure_changes(before, module)
    n_after = _count(module)
    ctx.report.update({"params_base": _count(ctx.base), "params_parent": n_before,
                       "params_ratio": round(n_after / max(_count(ctx.base), 1), 6)})
    log.info("pruned %s at %g: %d -> %d params", arch.get("model"), spec.ratio, n_before, n_after)
    ctx.report.update(recover(module, ctx, label="recover"))
    return module.eval(), arch


def _count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def tp_prune(module, example_inputs, ratio: float, ignored: list, **options: Any):
    """One torch-pruning pass: L2 group magnitude, uniform ``ratio`` per layer."""
    import torch
    import torch_pruning as tp

    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            module, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=ignored, round_to=ROUND_TO, **options)
        pruner.step()
    return pruner


@register_pruner("resnet")
def prune_resnet(module, ratio: float, arch: dict, ctx: TransformContext) -> dict:
    example = ctx.family.example_inputs(arch, 1, seed=ctx.seed)
    tp_prune(module, example, ratio, ignored=[module.fc])
    return arch


def prune_generic(module, ratio: float, arch: dict, ctx: TransformContext) -> dict:
    """Any nn.Module: keep the output layer (last Linear, else last conv) whole."""
    import torch
    from torch import nn

    example = ctx.family.example_inputs(arch, 2, seed=ctx.seed)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    ignored = (linears or convs)[-1:]
    with torch.no_grad():
        shape = tuple(module(*example).shape)
    tp_prune(module, example, ratio, ignored=ignored)
    with torch.no_grad():
        new_shape = tuple(module(*example).shape)
    if new_shape != shape:
        raise SpecError(f"pruning {arch.get('model')!r} changed its output shape {shape} -> "
                        f"{new_shape}: its output layer is not its last Linear/conv; register "
                        f"a pruner with variants.prune.register_pruner({ctx.family.name!r})")
    return arch


@register_pruner("bert")
def prune_bert(module, ratio: float, arch: dict, ctx: TransformContext) -> dict:
    """Remove whole heads and FFN units, the same number in every layer; keep hidden size."""
    attns = _self_attentions(module)
    heads = attns[0].num_attention_heads
    keep = max(1, round(heads * (1 - ratio)))
    inner = getattr(module, "bert", None) or module.model.bert
    ignored = [inner.embeddings]  # its output is the hidden size: keeps every hidden dim
    ignored += [m for m in (getattr(inner, "pooler", None),
                            getattr(getattr(module, "model", None), "classifier", None)) if m]
    num_heads = {lin: a.num_attention_heads for a in attns for lin in (a.query, a.key, a.value)}
    example = ctx.family.example_inputs(arch, 2, seed=ctx.seed, seq_len=16)
    # torch-pruning keeps int(heads * (1 - ratio)) heads: aim half a head above `keep`
    tp_prune(module, example, ratio, ignored=ignored, num_heads=num_heads, prune_num_heads=True,
             prune_head_dims=False, head_pruning_ratio=1 - (keep + 0.5) / heads,
             output_transform=lambda out: out.float().sum())
    for a in attns:  # torch-pruning changes the Linears, not the attention's bookkeeping
        a.all_head_size = a.query.out_features
        a.num_attention_heads = a.all_head_size // a.attention_head_size
    return _describe_bert(module, arch, attns)


def _self_attentions(module) -> list:
    from transformers.models.bert.modeling_bert import BertSelfAttention

    attns = [m for m in module.modules() if isinstance(m, BertSelfAttention)]
    if not attns:
        raise SpecError("no BertSelfAttention modules found: prune supports BERT-shaped models")
    return attns


def _describe_bert(module, arch: dict, attns: list) -> dict:
    """Put the uniform head count and FFN width into the config (checked uniform)."""
    heads = {a.num_attention_heads for a in attns}
    inter = {m.intermediate.dense.out_features for m in module.modules()
             if hasattr(m, "intermediate") and hasattr(m.intermediate, "dense")}
    if len(heads) != 1 or len(inter) != 1:
        raise SpecError(f"BERT pruning was not uniform across layers (heads {sorted(heads)}, "
                        f"FFN {sorted(inter)}); the config cannot describe it")
    config = dict(arch["config"])
    config["num_attention_heads"] = heads.pop()
    config["intermediate_size"] = inter.pop()
    if config["hidden_size"] % config["num_attention_heads"]:
        # transformers refuses hidden sizes that are not a multiple of the head count unless
        # the config has `embedding_size`; the shape hook restores the real head size
        config["embedding_size"] = config["hidden_size"]
    return {**arch, "config": config}


# ---- the structure record and the generic rebuild hook ------------------------------------

def _numeric_attrs(module) -> dict[str, Any]:
    """Structural attributes: ints, floats and tuples of ints (not flags, not private)."""
    out: dict[str, Any] = {}
    for k, v in vars(module).items():
        if k.startswith("_") or k == "training" or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, tuple) and v and all(isinstance(x, int) and not isinstance(x, bool)
                                               for x in v):
            out[k] = list(v)
    return out


def snapshot(module) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Tensor shapes and structural attributes of every submodule, to diff after pruning."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    attrs = {name: _numeric_attrs(m) for name, m in module.named_modules()}
    return shapes, attrs


def structure_changes(before, module) -> dict[str, dict]:
    """What pruning changed: new tensor shapes and, per changed module, all its attributes."""
    shapes0, attrs0 = before
    shapes = {k: list(v.shape) for k, v in module.state_dict().items()
              if shapes0.get(k) != tuple(v.shape)}
    owners = {k.rpartition(".")[0] for k in shapes}
    attrs = {}
    for name, m in module.named_modules():
        now = _numeric_attrs(m)
        if name in owners or now != attrs0.get(name, now):
            attrs[name] = now  # absolute values: rebuild may start from another config
    return {"shapes": shapes, "attrs": attrs}


def filter_structure(record: dict, module) -> dict:
    """The part of ``record`` that still applies to ``module`` (e.g. after truncation)."""
    names = set(module.state_dict())
    mods = {n for n, _ in module.named_modules()}
    return {"shapes": {k: v for k, v in record["shapes"].items() if k in names},
            "attrs": {k: v for k, v in record["attrs"].items() if k in mods}}


def apply_structure(module, record: dict):
    """Give ``module`` the recorded tensor shapes and attributes (values are loaded later)."""
    import torch

    for name, shape in record.get("shapes", {}).items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = torch.nn.Parameter(
                torch.zeros(shape, dtype=old.dtype), requires_grad=old.requires_grad)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = torch.zeros(shape, dtype=owner._buffers[leaf].dtype)
        else:
            raise KeyError(f"{name!r} is neither a parameter nor a buffer of the rebuilt model")
    for mod_name, attrs in record.get("attrs", {}).items():
        owner = module.get_submodule(mod_name)
        for k, v in attrs.items():
            setattr(owner, k, tuple(v) if isinstance(v, list) else v)
    return module


@register_rebuild_hook(None, STRUCTURE_KEY)
def _rebuild_pruned(module, arch: dict):
    return apply_structure(module, arch[STRUCTURE_KEY])
