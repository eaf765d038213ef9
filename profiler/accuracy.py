"""Accuracy (labelled top-1) and fidelity to the base variant.

Accuracy does not depend on the batch size, so it is measured once per
variant, device type, backend and evaluation set, through the same kind of
session that serves the variant (the ONNX graph on onnxruntime), not the
torch module it came from: quantization only exists in the graph.

Fidelity compares a variant's outputs with its base model's on the same
held-out inputs: top-1 agreement for classifiers, mean cosine similarity for
encoders (each sample's outputs flattened over its non-padding tokens). It is
what the cache can still promise when no labels exist.

Evaluation sets (``eval=``): ``digits`` (the built-in labelled eval split),
``text`` (the built-in unlabelled text eval split), ``random`` (random inputs
of the serving shape), a user path read by ``variants.data.load_data(path,
"eval")`` (``.npz`` with x/y, ``.npy``, ``.txt``, image folder), ``auto``
(digits for 10-class ResNets, text for BERT, random otherwise) or ``none``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from variants.backends import open_session
from variants.errors import BackendError, DataError
from variants.families import get_family
from variants.store import Manifest, Store

log = logging.getLogger(__name__)

BUILTIN_EVAL_SETS = ("auto", "digits", "text", "random", "none")
#: random inputs are costly at serving resolution and only measure fidelity
RANDOM_SAMPLES = 64


def resolve_eval(eval_set: str | None, manifest: Manifest) -> str | None:
    """The evaluation set to use for ``manifest``; ``None`` means do not evaluate."""
    if eval_set is None or eval_set in ("none", ""):
        return None
    if eval_set != "auto":
        return eval_set
    if manifest.family == "resnet" and manifest.arch.get("num_classes") == 10:
        return "digits"
    if manifest.family == "bert":
        return "text"
    return "random"


@dataclass(frozen=True)
class EvalBatch:
    """Model inputs by name, labels (or None) and the token mask (encoders) of one batch."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    mask: np.ndarray | None


@dataclass(frozen=True)
class AccuracyResult:
    eval_set: str
    samples: int
    accuracy: float | None
    fidelity: float | None
    fidelity_metric: str | None
    seconds: float


def eval_batches(manifest: Manifest, eval_set: str, *, samples: int = 512,
                 batch: int = 64) -> list[EvalBatch]:
    """Model-ready batches of ``eval_set`` for ``manifest``'s family and architecture."""
    fam = get_family(manifest.family)
    names = [i["name"] for i in manifest.inputs]
    out = []
    if eval_set == "random":
        n = min(samples, RANDOM_SAMPLES)
        for i, start in enumerate(range(0, n, batch)):
            xs = fam.example_inputs(manifest.arch, min(batch, n - start), seed=10_000 + i)
            out.append(_batch(names, xs, None))
        return out
    from variants.data import load_data

    ds = load_data(eval_set, "eval").take(samples)
    if len(ds) == 0:
        raise DataError(f"evaluation set {eval_set!r} is empty")
    for x, y in ds.batches(batch):
        out.append(_batch(names, fam.data_inputs(manifest.arch, x), y))
    return out


def _batch(names: list[str], tensors: Any, labels: np.ndarray | None) -> EvalBatch:
    arrays = [t.numpy() if hasattr(t, "numpy") else np.asarray(t) for t in tensors]
    if len(arrays) != len(names):
        raise DataError(f"the family produced {len(arrays)} inputs for {names}")
    inputs = dict(zip(names, arrays))
    return EvalBatch(inputs, labels, inputs.get("attention_mask"))


def top1_accuracy(outputs: list[np.ndarray], batches: list[EvalBatch]) -> float | None:
    """Share of labelled samples whose arg-max output is the label (None: no usable labels)."""
    correct = total = 0
    for y, b in zip(outputs, batches):
        if b.labels is None or y.ndim != 2:
            return None
        if b.labels.max(initial=0) >= y.shape[1]:
            log.warning("labels reach %d but the model has %d outputs: no accuracy",
                        int(b.labels.max()), y.shape[1])
            return None
        correct += int((y.argmax(1) == b.labels).sum())
        total += len(b.labels)
    return correct / total if total else None


def fidelity(outputs: list[np.ndarray], base: list[np.ndarray], batches: list[EvalBatch],
             task: str) -> tuple[float, str]:
    """(value, metric): top-1 agreement for classifiers, mean cosine similarity otherwise."""
    if task == "classification" and all(y.ndim == 2 for y in outputs):
        agree = sum(int((y.argmax(1) == z.argmax(1)).sum()) for y, z in zip(outputs, base))
        return agree / sum(len(y) for y in outputs), "top1_agreement"
    sims = []
    for y, z, b in zip(outputs, base, batches):
        for i in range(len(y)):
            a, c = y[i], z[i]
            if b.mask is not None and a.ndim >= 1 and a.shape[0] == b.mask.shape[1]:
                keep = b.mask[i].astype(bool)
                a, c = a[keep], c[keep]
            a, c = a.ravel().astype(np.float64), c.ravel().astype(np.float64)
            sims.append(float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c) + 1e-12)))
    return float(np.mean(sims)), "cosine"


class Evaluator:
    """Evaluates the variants of one store on one device and backend.

    Inputs are built once per (base model, eval set) from the base's
    architecture, so a variant and its base always see identical inputs; the
    base's outputs are computed once and reused for every variant's fidelity.
    """

    def __init__(self, store: Store | str, *, device: str = "cpu",
                 backend: str = "onnxruntime", threads: int | None = None,
                 samples: int = 512, batch: int = 64):
        self.store = store if isinstance(store, Store) else Store(store)
        self.device, self.backend, self.threads = device, backend, threads
        self.samples, self.batch = samples, batch
        self._batches: dict[tuple[str, str], list[EvalBatch]] = {}
        self._base_out: dict[tuple[str, str], list[np.ndarray] | None] = {}

    def _base(self, manifest: Manifest) -> Manifest | None:
        return self.store.get(manifest.base) if manifest.base in self.store else None

    def batches(self, manifest: Manifest, eval_set: str) -> list[EvalBatch]:
        base = self._base(manifest) or manifest
        k = (base.key, eval_set)
        if k not in self._batches:
            self._batches[k] = eval_batches(base, eval_set, samples=self.samples,
                                            batch=self.batch)
        return self._batches[k]

    def outputs(self, manifest: Manifest, batches: list[EvalBatch]) -> list[np.ndarray]:
        session = open_session(self.store, manifest.name, device=self.device,
                               backend=self.backend, threads=self.threads, verify=False)
        try:
            return [np.asarray(session.run(b.inputs)) for b in batches]
        finally:
            session.close()

    def base_outputs(self, manifest: Manifest, eval_set: str) -> list[np.ndarray] | None:
        base = self._base(manifest)
        if base is None:
            log.warning("%s: its base %r is not in the store; no fidelity", manifest.name,
                        manifest.base)
            return None
        k = (base.key, eval_set)
        if k not in self._base_out:
            try:
                self._base_out[k] = self.outputs(base, self.batches(manifest, eval_set))
            except BackendError as e:
                log.warning("base %s cannot run (%s); no fidelity for its variants", base.name, e)
                self._base_out[k] = None
        return self._base_out[k]

    def evaluate(self, manifest: Manifest, eval_set: str) -> AccuracyResult:
        """Accuracy (when ``eval_set`` has labels) and fidelity of one variant."""
        t0 = time.perf_counter()
        batches = self.batches(manifest, eval_set)
        outs = self.outputs(manifest, batches)
        base = self._base(manifest)
        if base is not None and base.key == manifest.key:
            # the base's own outputs serve every later variant of it
            self._base_out.setdefault((base.key, eval_set), outs)
        ref = self.base_outputs(manifest, eval_set)
        fid, metric = fidelity(outs, ref, batches, manifest.task) if ref is not None \
            else (None, None)
        acc = top1_accuracy(outs, batches) if manifest.task == "classification" else None
        return AccuracyResult(eval_set, sum(len(y) for y in outs), acc, fid, metric,
                              time.perf_counter() - t0)
