"""Brief supervised training on a labelled data set (built-in ``digits`` by default).

No pretrained weights can be downloaded here, so examples and tests get a real
accuracy number by training a model for a few epochs on scikit-learn's
bundled digits at 32x32 (about 1/49 of the cost of 224x224).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from variants.data import load_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    train_accuracy: float
    eval_accuracy: float
    weights: Path | None


def evaluate(module, family, arch, source: str = "digits", split: str = "heldout",
             batch: int = 128) -> float:
    """Top-1 accuracy of a torch module on a labelled split."""
    import torch

    ds = load_data(source, split)
    if ds.labels is None:
        raise ValueError(f"data source {source!r} has no labels")
    correct = 0
    module.eval()
    with torch.no_grad():
        for x, y in ds.batches(batch):
            out = module(*family.data_inputs(arch, x))
            correct += int((out.argmax(1).numpy() == y).sum())
    return correct / len(ds)


def train(module, family, arch, *, source: str = "digits", epochs: int = 4, batch: int = 64,
          lr: float = 1e-3, seed: int = 0, out: str | Path | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Train ``module`` in place with Adam and cross-entropy; optionally save safetensors."""
    import torch

    torch.manual_seed(seed)
    ds = load_data(source, "train")
    if ds.labels is None:
        raise ValueError(f"data source {source!r} has no labels to train on")
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr * 3, total_steps=epochs * ((len(ds) + batch - 1) // batch))
    steps = epochs * ((len(ds) + batch - 1) // batch)
    step, correct, seen = 0, 0, 0
    for _ in range(epochs):
        module.train()
        order = rng.permutation(len(ds))
        correct, seen = 0, 0
        for i in range(0, len(ds), batch):
            idx = order[i:i + batch]
            xs = family.data_inputs(arch, ds.inputs[idx])
            y = torch.as_tensor(ds.labels[idx])
            logits = module(*xs)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            step += 1
            if progress:
                progress("train", step, steps)
    module.eval()
    acc = evaluate(module, family, arch, source)
    path = None
    if out is not None:
        from variants.weights import save_state_dict

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(module, path)
    log.info("trained %s for %d epochs: train %.3f, eval %.3f", arch.get("model"), epochs,
             correct / max(seen, 1), acc)
    return TrainResult(epochs, correct / max(seen, 1), acc, path)
