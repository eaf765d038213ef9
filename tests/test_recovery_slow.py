"""Recovery on a really trained model: digits ResNet-18, pruned by half and cut after layer 3.

About two minutes on 2 cores (35 s training, 35 s distilling the pruned model).
"""

from __future__ import annotations

import numpy as np
import pytest

import variants
from variants.data import load_data
from variants.train import train

pytestmark = pytest.mark.slow


def _onnx_accuracy(store, name: str) -> float:
    """Labelled accuracy of the stored ONNX graph itself on the held-out digits split."""
    m = store.get(name)
    fam = variants.get_family(m.family)
    sess = variants.open_session(store, name)
    ds = load_data("digits", "eval")
    correct = sum(int((sess.run(fam.data_inputs(m.arch, x)[0].numpy()).argmax(1) == y).sum())
                  for x, y in ds.batches(100))
    return correct / len(ds)


def test_digits_resnet18_keeps_accuracy_after_prune_and_exit(tmp_path):
    fam = variants.get_family("resnet")
    built = fam.build("resnet18", num_classes=10, resolution=32)
    weights = tmp_path / "resnet18-digits.safetensors"
    trained = train(built.module, fam, built.arch, epochs=3, out=weights)
    assert trained.eval_accuracy >= 0.9

    variants.generate("resnet18", tmp_path / "store", weights=str(weights), num_classes=10,
                      resolution=32, prune=[0.5], exits=[3])
    store = variants.Store(tmp_path / "store")
    base = trained.eval_accuracy

    pruned = store.get("resnet18+prune0.5").metrics
    assert pruned["accuracy_base"] == pytest.approx(base)  # same held-out split
    assert pruned["accuracy_after"] >= 0.95 * base
    assert pruned["accuracy_after"] > pruned["accuracy_before"]
    assert pruned["fidelity_after"] > pruned["fidelity_before"]

    cut = store.get("resnet18+exit3").metrics
    assert cut["accuracy_after"] >= 0.90 * base
    assert cut["recover_mode"] == "head"

    # the stored artefacts, not just the in-memory modules, keep that accuracy
    for name, metrics in (("resnet18+prune0.5", pruned), ("resnet18+exit3", cut)):
        assert _onnx_accuracy(store, name) == pytest.approx(metrics["accuracy_after"],
                                                            abs=0.01), name
    assert np.isfinite(pruned["recover_seconds"])
