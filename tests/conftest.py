"""Shared fixtures: tiny real models in real stores, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """resnet10 (10 classes, 32x32) base + int8 + fp16, and bert-tiny base + int8."""
    import variants

    root = tmp_path_factory.mktemp("store")
    variants.generate("resnet10", root, quantize=["int8", "fp16"], num_classes=10,
                      resolution=32)
    variants.generate("bert-tiny", root, quantize=["int8"])
    return variants.Store(root)
