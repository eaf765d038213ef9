"""Exported and quantized variants run in onnxruntime with the promised shapes and sizes."""

import numpy as np
import pytest
import torch
from torch import nn

import variants
from variants import ExportError
from variants.export import check_onnx


@pytest.mark.parametrize("batch", [1, 4])
def test_resnet_variants_run(tiny_store, batch):
    for name in ("resnet10", "resnet10+int8", "resnet10+fp16"):
        s = variants.open_session(tiny_store, name)
        out = s.run(np.random.default_rng(0).standard_normal((batch, 3, 32, 32)))
        assert out.shape == (batch, 10), name
        # spatial axes are dynamic: the same graph serves 64x64
        assert s.run(np.zeros((batch, 3, 64, 64), np.float32)).shape == (batch, 10)


def test_int8_is_small_and_faithful(tiny_store):
    base, q = tiny_store.get("resnet10"), tiny_store.get("resnet10+int8")
    assert q.bytes <= 0.3 * base.bytes
    assert q.metrics["int8_method"] == "static-qdq-per-channel"
    assert q.metrics["cosine_to_parent"] > 0.9
    f16 = tiny_store.get("resnet10+fp16")
    assert 0.4 * base.bytes < f16.bytes < 0.6 * base.bytes


@pytest.mark.parametrize("batch,seq", [(1, 8), (4, 21)])
def test_bert_variants_run(tiny_store, batch, seq):
    for name in ("bert-tiny", "bert-tiny+int8"):
        s = variants.open_session(tiny_store, name)
        ids = np.random.default_rng(1).integers(1000, 30000, (batch, seq))
        out = s.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert out.shape == (batch, seq, 128)
    q = tiny_store.get("bert-tiny+int8")
    assert q.metrics["int8_method"] == "dynamic-per-channel"
    assert q.bytes <= 0.3 * tiny_store.get("bert-tiny").bytes


def test_torch_backend_matches_onnx(tiny_store):
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    a = variants.open_session(tiny_store, "resnet10").run(x)
    b = variants.open_session(tiny_store, "resnet10", backend="torch").run(x)
    np.testing.assert_allclose(a, b, atol=1e-3)
    with pytest.raises(variants.BackendError, match="onnxruntime"):
        variants.open_session(tiny_store, "resnet10+int8", backend="torch")


def test_session_input_errors(tiny_store):
    s = variants.open_session(tiny_store, "bert-tiny")
    with pytest.raises(variants.BackendError, match="input_ids"):
        s.run(np.zeros((1, 4), np.int64))
    with pytest.raises(variants.UnknownNameError, match="known: onnxruntime, torch"):
        variants.open_session(tiny_store, "bert-tiny", backend="tvm")
    with pytest.raises(variants.BackendError, match="int8"):
        variants.open_session(tiny_store, "resnet10+int8", device="cuda")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(x))


def test_any_module_through_the_api(tmp_path):
    torch.manual_seed(0)
    res = variants.generate("tinynet", tmp_path, module=TinyNet(),
                            example_inputs=torch.randn(2, 16), quantize=["int8", "fp16"])
    assert [r.name for r in res] == ["tinynet", "tinynet+int8", "tinynet+fp16"]
    for r in res:
        out = variants.open_session(tmp_path, r.name).run(np.ones((3, 16), np.float32))
        assert out.shape == (3, 5)
    with pytest.raises(variants.BackendError, match="register_custom_factory"):
        variants.open_session(tmp_path, "tinynet", backend="torch")
    variants.register_custom_factory("tinynet", TinyNet)
    s = variants.open_session(tmp_path, "tinynet", backend="torch")
    assert s.run(np.ones((3, 16), np.float32)).shape == (3, 5)


def test_export_check_refuses_a_graph_that_disagrees(tiny_store):
    fam = variants.get_family("resnet")
    m = tiny_store.get("resnet10")
    other = fam.rebuild(m.arch)  # same structure, different (random) weights
    with pytest.raises(ExportError, match="disagrees"):
        check_onnx(other, fam, m.arch, m.onnx_path)


def test_custom_module_needs_example_inputs(tmp_path):
    with pytest.raises(variants.DataError, match="example_inputs"):
        variants.generate("x", tmp_path, module=TinyNet())
