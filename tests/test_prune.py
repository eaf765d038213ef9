"""Pruned variants: sizes, stored structure, ONNX and torch backends, recovery, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import variants
from variants import Prune, SpecError
from variants.data import calibration
from variants.transforms import TransformContext, torch_transform


@pytest.fixture(scope="module")
def resnet_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-resnet")
    variants.generate("resnet10", root, prune=[0.5], quantize=["int8"], combine=True,
                      num_classes=10, recover_steps=5, resolution=32)
    return variants.Store(root)


@pytest.fixture(scope="module")
def bert_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-bert")
    variants.generate("bert-tiny", root, prune=[0.5], recover_steps=3, calib="random", seq_len=16)
    return variants.Store(root)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _transform(model: str, spec, *, recover_steps: int = 0, calib: str = "random",
               **build):
    """Apply one torch transform without exporting (fast size and rebuild checks)."""
    fam = variants.get_family(variants.family_of(model).name)
    built = fam.build(model, **build)
    ctx = TransformContext(family=fam, base=built.module, base_arch=built.arch,
                           calib=calibration(fam, built.arch, calib), recover_steps=recover_steps)
    module, arch = torch_transform(spec)(copy.deepcopy(built.module), spec,
                                         copy.deepcopy(built.arch), ctx)
    return fam, built, module.eval(), arch, ctx.report


def _rebuilt_equal(fam, module, arch, inputs) -> None:
    """The store's path: rebuild from arch alone, load the state dict strictly, same outputs."""
    import torch

    rebuilt = fam.rebuild(arch)
    rebuilt.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*inputs), module(*inputs))


def test_every_resnet_variant_runs_in_onnxruntime(resnet_store):
    assert set(resnet_store.names()) == {"resnet10", "resnet10+int8", "resnet10+prune0.5",
                                         "resnet10+prune0.5+int8"}
    for name in resnet_store.names():
        sess = variants.open_session(resnet_store, name)
        for batch in (1, 4):
            x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), np.float32)
            assert sess.run(x).shape == (batch, 10), name


def test_torch_backend_rebuilds_pruned_resnet_from_safetensors(resnet_store):
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), np.float32)
    onnx = variants.open_session(resnet_store, "resnet10+prune0.5").run(x)
    torch_out = variants.open_session(resnet_store, "resnet10+prune0.5", backend="torch").run(x)
    np.testing.assert_allclose(torch_out, onnx, rtol=1e-4, atol=1e-4)


def test_pruned_manifest_records_structure_and_recovery(resnet_store):
    m = resnet_store.get("resnet10+prune0.5")
    shapes = m.arch["pruned"]["shapes"]
    assert shapes["conv1.weight"] == [32, 3, 7, 7]
    assert all(s[0] % 8 == 0 for k, s in shapes.items() if k.endswith("conv1.weight"))
    assert m.arch["pruned"]["attrs"]["fc"]["in_features"] == 256
    assert m.metrics["recover_steps"] == 5
    assert m.metrics["fidelity_metric"] == "top1_agreement"
    assert m.metrics["fidelity_data"] == "digits:eval"  # held out: never trained on
    for key in ("fidelity_before", "fidelity_after", "accuracy_base", "accuracy_before",
                "accuracy_after"):
        assert 0.0 <= m.metrics[key] <= 1.0
    assert m.params <= 0.3 * resnet_store.get("resnet10").params


def test_resnet18_prune_half_keeps_under_30_percent_of_params():
    _, built, module, arch, report = _transform("resnet18", Prune(0.5), resolution=32)
    assert _params(module) <= 0.30 * _params(built.module)
    assert report["params_ratio"] <= 0.30
    assert module.fc.out_features == 1000 and module.fc.in_features == 256
    # recover_steps=0 skips training: fidelity is measured once
    assert report["recover_steps"] == 0 and "recover_data" not in report
    assert report["fidelity_before"] == report["fidelity_after"]


def test_every_bert_variant_runs_in_onnxruntime_and_torch(bert_store):
    m = bert_store.get("bert-tiny+prune0.5")
    assert m.arch["config"]["num_attention_heads"] == 1
    assert m.arch["config"]["intermediate_size"] == 256
    assert m.metrics["fidelity_metric"] == "cosine"
    fam = variants.get_family("bert")
    for name in bert_store.names():
        sess = variants.open_session(bert_store, name)
        for batch in (1, 4):
            ids, mask = fam.example_inputs(m.arch, batch, seq_len=7, seed=batch)
            assert sess.run([ids.numpy(), mask.numpy()]).shape == (batch, 7, 128), name
    ids, mask = fam.example_inputs(m.arch, 3, seq_len=11)
    mask[1, 6:] = 0
    onnx = variants.open_session(bert_store, m.name).run([ids.numpy(), mask.numpy()])
    torch_out = variants.open_session(bert_store, m.name, backend="torch").run([ids, mask])
    np.testing.assert_allclose(torch_out, onnx, rtol=1e-4, atol=1e-4)


def test_bert_head_count_not_dividing_hidden_size_still_rebuilds():
    # bert-mini: 4 heads of 64 over hidden 256; keeping 3 heads leaves 256 % 3 != 0
    fam, built, module, arch, _ = _transform("bert-mini", Prune(0.25), seq_len=16)
    attn = module.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.attention_head_size) == (3, 64)
    assert arch["config"]["num_attention_heads"] == 3
    _rebuilt_equal(fam, module, arch, fam.example_inputs(arch, 2, seq_len=9))


def test_bert_classifier_prune_keeps_its_classes():
    fam, built, module, arch, report = _transform("bert-tiny", Prune(0.5), num_classes=3,
                                                  seq_len=16)
    assert module.model.classifier.out_features == 3
    assert report["fidelity_metric"] == "top1_agreement"
    _rebuilt_equal(fam, module, arch, fam.example_inputs(arch, 2, seq_len=9))


def _mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 5))


def test_custom_module_prunes_everything_but_its_output_layer(tmp_path):
    import torch

    torch.manual_seed(0)
    variants.register_custom_factory("mlp", _mlp)
    variants.generate("mlp", tmp_path, module=_mlp(), example_inputs=torch.randn(2, 12),
                      prune=[0.5], recover_steps=3)
    store = variants.Store(tmp_path)
    m = store.get("mlp+prune0.5")
    assert m.params < 0.5 * store.get("mlp").params
    x = np.random.default_rng(0).standard_normal((4, 12), np.float32)
    onnx = variants.open_session(store, m.name).run(x)
    assert onnx.shape == (4, 5)
    np.testing.assert_allclose(variants.open_session(store, m.name, backend="torch").run(x),
                               onnx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, float("nan")])
def test_ratio_outside_open_interval_names_the_valid_range(ratio, tmp_path):
    with pytest.raises(SpecError, match=r"\(0, 1\)"):
        Prune(ratio)
    with pytest.raises(SpecError, match=r"\(0, 1\)"):
        variants.generate("resnet10", tmp_path, prune=[ratio], num_classes=10, resolution=32)
    assert not list((tmp_path / "variants").glob("*"))  # nothing built before validation
