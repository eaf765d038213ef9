"""The BERT family's torch modules: the wrappers memadapt exports, truncated encoders and
classifiers, their exit heads, and the stages the dynamic runner runs.

Imported only where torch is already needed (``import variants`` stays torch-free).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class BertEncoder(nn.Module):
    """``forward(input_ids, attention_mask) -> last_hidden_state`` (B, T, H)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class BertClassifier(nn.Module):
    """``forward(input_ids, attention_mask) -> logits`` (B, C)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def bert_layer_mask(bert, attention_mask, h):
    """The mask BERT's layers expect (transformers 5 builds it in ``_create_attention_masks``,
    a private method whose arguments move between releases: 5.25 made ``position_ids`` one
    more required argument, so each one it takes is passed, and only those)."""
    make = getattr(bert, "_create_attention_masks", None)
    if make is None:  # transformers 4
        return bert.get_extended_attention_mask(attention_mask, attention_mask.shape)
    offered = {"attention_mask": attention_mask, "encoder_attention_mask": None,
               "embedding_output": h, "encoder_hidden_states": None, "cache": None,
               "past_key_values": None, "cache_position": None, "position_ids": None}
    return make(**{k: offered[k] for k in _parameters(type(bert)._create_attention_masks)
                   if k in offered})[0]


@functools.cache
def _parameters(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


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
        return _hidden(self.layer(h, mask))


class LayersHead(nn.Module):
    """BERT encoder layers in turn as an exit head: ``(hidden, layer mask) -> hidden``."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: torch.Tensor, mask: Any = None) -> torch.Tensor:
        for layer in self.layers:
            h = _hidden(layer(h, mask))
        return h


class PoolClassifyHead(nn.Module):
    """A BERT classifier's top: pooler (first token, dense, tanh), dropout, classifier."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, h: torch.Tensor, mask: Any = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(h)))


class BertEncoderExit(nn.Module):
    """A truncated BERT encoder plus a head mimicking the final hidden states."""

    def __init__(self, bert: nn.Module, head: nn.Module):
        super().__init__()
        self.bert, self.head = bert, head

    def forward_features(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h, bert_layer_mask(self.bert, attention_mask, h)

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


class BertStem(nn.Module):
    """Embeddings and the attention mask in the form the encoder layers take."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.embeddings = bert.embeddings
        self._mask = functools.partial(bert_layer_mask, bert)

    def forward(self, input_ids, attention_mask):
        h = self.embeddings(input_ids=input_ids)
        return h, self._mask(attention_mask, h)


class BertBlock(nn.Module):
    """One encoder layer on ``(hidden, mask)`` state."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h, mask=None):
        return _hidden(self.layer(h, mask)), mask


class TakeHidden(nn.Module):
    """The final head of an encoder's stages: the hidden states themselves."""

    def forward(self, h, mask=None):
        return h


def narrow_bert_layer(layer, keep: float = 0.5):
    """A copy of a BERT encoder layer with the ``keep`` fraction of its attention heads and
    FFN neurons, those with the largest weight norms (in and out). Only the shapes matter
    when a stored variant is rebuilt (its weights are loaded over them)."""
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
