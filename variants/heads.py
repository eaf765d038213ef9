"""Task heads on one frozen backbone: several task models that share every backbone tensor.

Multi-model hosting (DESIGN.md) pays off when models have a common part. The common case
in production is several classifiers fine-tuned on one frozen encoder; this module makes
such models for the BERT family without downloads::

    generate_heads("minilm", ["topic", "module"], "store", exits=[3])

trains one classification head (pooler + linear) per label set on the frozen backbone,
stores each task model as its own base (``minilm-topic``, ``minilm-module``) with the
requested variants, and leaves the backbone bit-identical in all of them, so a
:class:`~adaptive.cache.VariantCache` with ``share_weights=True`` holds it once.

Label sets: built in, ``topic`` (5 coarse topics) and ``module`` (the 8 best-documented
modules), both labelling sentences of the built-in text corpus (Python's standard-library
docstrings) by what they document; or a user's ``.tsv`` file of ``text<TAB>label`` lines.
Training runs the backbone once over the texts and fits the head on the cached features
(seconds), then reports held-out accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from variants.errors import DataError, KeyConflictError, SpecError

__all__ = ["HeadResult", "LabelSet", "generate_heads", "list_label_sets", "load_label_set",
           "train_head"]

log = logging.getLogger(__name__)

#: Coarse topics of the built-in corpus's modules (modules not listed are left out).
TOPICS = {
    "text": ("re", "string", "textwrap", "difflib", "csv", "json"),
    "files": ("os", "pathlib", "shutil", "tempfile", "zipfile"),
    "numbers": ("decimal", "fractions", "statistics", "random", "heapq", "bisect"),
    "structure": ("functools", "itertools", "collections", "dataclasses", "contextlib",
                  "inspect"),
    "runtime": ("argparse", "logging", "threading", "queue", "unittest", "datetime",
                "calendar"),
}
_BUILT_IN = {"topic": "5 coarse topics of the text corpus's sentences (text, files, numbers, "
                      "structure, runtime)",
             "module": "which of the 8 best-documented modules a corpus sentence documents"}
_HELD_OUT = 0.3  # share of a label set kept for the held-out accuracy


@dataclass(frozen=True)
class LabelSet:
    """Labelled texts: ``texts[i]`` has class ``labels[i]`` (an index into ``classes``)."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.classes, self.texts]).encode())
        h.update(self.labels.astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def split(self, seed: int = 0) -> tuple[LabelSet, LabelSet]:
        """A deterministic (train, held-out) split, stratified by class."""
        rng = np.random.default_rng(seed)
        train, held = [], []
        for c in range(len(self.classes)):
            idx = rng.permutation(np.flatnonzero(self.labels == c))
            cut = int(round(len(idx) * _HELD_OUT))
            held += idx[:cut].tolist()
            train += idx[cut:].tolist()
        return self._take(sorted(train), "train"), self._take(sorted(held), "heldout")

    def _take(self, idx: list[int], part: str) -> LabelSet:
        return LabelSet(f"{self.name}:{part}", tuple(self.texts[i] for i in idx),
                        self.labels[idx], self.classes)


def list_label_sets() -> dict[str, str]:
    """Built-in label sets and what they label."""
    return dict(_BUILT_IN)


def parse_label_sets(text: str) -> list[str]:
    """``"topic,module"`` -> ``["topic", "module"]``; nothing given is a SpecError that
    lists the built-in sets."""
    sets = [h.strip() for h in str(text).split(",") if h.strip()]
    if not sets:
        raise SpecError(f"give label sets to train heads on: built-in "
                        f"{', '.join(list_label_sets())} or .tsv files of text<TAB>label lines")
    return sets


def check_head_options(backbone: str, given: Mapping[str, Any]) -> None:
    """Refuse what a task-head run decides itself, before any work: heads are built in for
    the BERT family; each task model is named ``<backbone>-<label set>`` and sized by its
    labels, its backbone is the built-in model as is, and it trains on its label set. So
    ``given`` (option -> value, named as the caller spells them, e.g. ``"--num-classes"``)
    must leave name, class count, weights, calibration data and resolution unset (None or
    False); a SpecError names the ones that are set."""
    from variants.families import family_of

    fam = family_of(backbone)
    if fam.name != "bert":
        raise SpecError(f"task heads are built in for the BERT family; {backbone!r} is "
                        f"{fam.name}: drop --heads or use a BERT model (e.g. minilm)")
    clash = [opt for opt, value in given.items() if value is not None and value is not False]
    if clash:
        raise SpecError(f"heads name and size their task models themselves (from the label "
                        f"sets, on {backbone!r} as built); drop {', '.join(clash)}")


def load_label_set(spec: str) -> LabelSet:
    """A built-in label set by name, or a ``.tsv`` file of ``text<TAB>label`` lines."""
    from variants.data import labelled_corpus

    if spec in _BUILT_IN:
        pairs = labelled_corpus()
        if spec == "topic":
            topic_of = {mod: t for t, mods in TOPICS.items() for mod in mods}
            rows = [(s, topic_of[m]) for s, m in pairs if m in topic_of]
        else:
            top = [m for m, _ in Counter(m for _, m in pairs).most_common(8)]
            rows = [(s, m) for s, m in pairs if m in top]
        return _label_set(spec, rows)
    p = Path(spec)
    if p.suffix.lower() != ".tsv":
        raise DataError(f"unknown label set {spec!r}: use a built-in one "
                        f"({', '.join(_BUILT_IN)}) or a .tsv file of text<TAB>label lines")
    if not p.is_file():
        raise DataError(f"label file {spec!r} does not exist")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        text, tab, label = line.rpartition("\t")
        if not tab or not text.strip() or not label.strip():
            raise DataError(f"{spec}:{n}: expected 'text<TAB>label', got {line[:60]!r}")
        rows.append((text.strip(), label.strip()))
    return _label_set(p.stem, rows)


def _label_set(name: str, rows: Sequence[tuple[str, str]]) -> LabelSet:
    classes = tuple(sorted({label for _, label in rows}))
    if len(classes) < 2:
        raise DataError(f"label set {name!r} has {len(classes)} class(es); a head needs at "
                        f"least 2")
    counts = Counter(label for _, label in rows)
    few = sorted(c for c, k in counts.items() if k < 5)
    if few:
        raise DataError(f"label set {name!r}: classes {few} have fewer than 5 texts; add "
                        f"examples or merge them")
    index = {c: i for i, c in enumerate(classes)}
    return LabelSet(name, tuple(t for t, _ in rows),
                    np.array([index[label] for _, label in rows], dtype=np.int64), classes)


@dataclass(frozen=True)
class HeadResult:
    """A trained task model: where its ``from_pretrained`` folder is, how good it is."""

    name: str
    folder: Path
    classes: tuple[str, ...]
    train_accuracy: float
    heldout_accuracy: float
    samples: int
    reused: bool = False


def _features(inner, fam, arch, texts: Sequence[str], batch: int = 32):
    """The frozen encoder's [CLS] hidden state for every text (what the head sees)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            ids, mask = fam.data_inputs(arch, list(texts[i:i + batch]))
            hidden = inner.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(hidden[:, 0])
    return torch.cat(out)


def train_head(backbone: str, labels: LabelSet, out: str | Path, *, epochs: int = 30,
               lr: float = 3e-3, seed: int = 0,
               progress: Callable[[str, int, int], None] | None = None) -> HeadResult:
    """Train a classification head for ``labels`` on the frozen ``backbone`` (a BERT-family
    model) and save the task model as a ``from_pretrained`` folder at ``out``.

    Only the pooler and the classifier learn (on features computed once without
    gradients), so every backbone tensor stays bit-identical to ``backbone``'s, which is
    what lets task models share it in memory.
    """
    import torch

    from variants.families import family_of

    fam = family_of(backbone)
    if fam.name != "bert":
        raise SpecError(f"task heads are built in for the BERT family; {backbone!r} is "
                        f"{fam.name}")
    train, held = labels.split(seed)
    torch.manual_seed(seed)
    built = fam.build(backbone, num_classes=len(labels.classes))
    inner = built.module.model  # BertForSequenceClassification
    inner.eval()
    if progress:
        progress(f"{labels.name}: encoding {len(labels.texts)} texts", 0, epochs)
    f_train = _features(inner, fam, built.arch, train.texts)
    f_held = _features(inner, fam, built.arch, held.texts)
    y_train = torch.as_tensor(train.labels)
    head = list(inner.bert.pooler.parameters()) + list(inner.classifier.parameters())
    opt = torch.optim.AdamW(head, lr=lr, weight_decay=0.01)

    def logits(f):
        return inner.classifier(inner.bert.pooler.activation(inner.bert.pooler.dense(f)))

    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(y_train), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(logits(f_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress:
            progress(f"{labels.name}: training the head", epoch + 1, epochs)
    with torch.no_grad():
        acc_train = float((logits(f_train).argmax(1) == y_train).float().mean())
        acc_held = float((logits(f_held).argmax(1) ==
                          torch.as_tensor(held.labels)).float().mean())
    inner.config.id2label = dict(enumerate(labels.classes))
    inner.config.label2id = {c: i for i, c in enumerate(labels.classes)}
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".head-", dir=out.parent))
    try:
        inner.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s head on %s: train %.3f, held-out %.3f (%d texts, %d classes)", labels.name,
             backbone, acc_train, acc_held, len(labels.texts), len(labels.classes))
    return HeadResult(labels.name, out, labels.classes, acc_train, acc_held, len(labels.texts))


def generate_heads(backbone: str, heads: Sequence[str], store, *, exits: Sequence[int] = (),
                   quantize: Sequence[str] = (), prune: Sequence[float] = (),
                   combine: bool = False, seed: int = 0, recover_steps: int | None = None,
                   epochs: int = 30,
                   progress: Callable[[str, int, int], None] | None = None
                   ) -> list[tuple[HeadResult, list[Any]]]:
    """Train one head per label set in ``heads`` on ``backbone`` and generate each task
    model (``<backbone>-<label set>``) with the requested variants into ``store``.

    Resumable: a head already trained with the same backbone, labels, epochs and seed is
    reused from ``<store>/heads/``, and variants already stored are skipped.
    Returns ``(head, generate results)`` per label set.
    """
    from variants.generate import generate
    from variants.store import Store, atomic_write_text

    if not heads:
        raise SpecError("give at least one label set (e.g. topic,module)")
    if len(set(heads)) != len(heads):
        raise SpecError(f"label sets repeat: {list(heads)}")
    sets = [load_label_set(h) for h in heads]  # every one checked before any work
    names = [f"{backbone}-{ls.name}" for ls in sets]
    if len(set(names)) != len(names):
        raise SpecError(f"two label sets give the same model name: {names}")
    store = store if isinstance(store, Store) else Store(store, create=True)
    out = []
    for ls, name in zip(sets, names):
        folder = store.root / "heads" / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        meta = {"backbone": backbone, "labels": ls.digest(), "epochs": epochs, "seed": seed}
        stamp = folder / "memadapt-head.json"
        saved = json.loads(stamp.read_text()) if stamp.is_file() else {}
        if saved.get("key") == meta:
            head = HeadResult(ls.name, folder, tuple(saved["classes"]), saved["train_accuracy"],
                              saved["heldout_accuracy"], saved["samples"], reused=True)
        else:
            head = train_head(backbone, ls, folder, epochs=epochs, seed=seed, progress=progress)
            atomic_write_text(stamp, json.dumps(
                {"key": meta, "classes": list(head.classes),
                 "train_accuracy": head.train_accuracy,
                 "heldout_accuracy": head.heldout_accuracy, "samples": head.samples}, indent=2))
        try:
            results = generate(backbone, store, weights=str(folder),
                               num_classes=len(ls.classes), name=name, exits=exits,
                               quantize=quantize, prune=prune, combine=combine, seed=seed,
                               recover_steps=recover_steps, progress=progress)
        except KeyConflictError:
            raise KeyConflictError(
                f"{name!r} is already in {store.root}, made from other labels, another "
                f"backbone or other options; delete its variants ({store.root / 'variants'}/"
                f"{name}*) and {folder}, or use another store") from None
        out.append((head, results))
    return out

