"""Early-exit variants (truncated exit@k), their combinations, and the dynamic exit runner."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import variants
from variants import EarlyExit, SpecError
from variants.data import calibration
from variants.early_exit import DynamicEarlyExit, build_dynamic_exit
from variants.transforms import TransformContext, torch_transform
from variants.weights import load_state_dict_file


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit-resnet")
    variants.generate("resnet10", root, prune=[0.5], exits=[2], quantize=["int8"], combine=True,
                      num_classes=10, recover_steps=5, resolution=32)
    return variants.Store(root)


@pytest.fixture(scope="module")
def resnet10():
    fam = variants.get_family("resnet")
    built = fam.build("resnet10", num_classes=10, resolution=32)
    return fam, built


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _exit(model: str, at: int, **build):
    fam = variants.family_of(model)
    built = fam.build(model, **build)
    ctx = TransformContext(family=fam, base=built.module, base_arch=built.arch,
                           calib=calibration(fam, built.arch, "random"), recover_steps=0)
    module, arch = torch_transform(EarlyExit(at))(copy.deepcopy(built.module), EarlyExit(at),
                                                  copy.deepcopy(built.arch), ctx)
    return fam, built, module.eval(), arch


def test_every_combined_variant_runs_in_onnxruntime(store):
    expected = {f"resnet10{p}{e}{q}" for p in ("", "+prune0.5") for e in ("", "+exit2")
                for q in ("", "+int8")}
    assert set(store.names()) == expected
    for name in store.names():
        sess = variants.open_session(store, name)
        for batch in (1, 4):
            x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32), np.float32)
            assert sess.run(x).shape == (batch, 10), name


@pytest.mark.parametrize("name", ["resnet10+exit2", "resnet10+prune0.5+exit2"])
def test_torch_backend_rebuilds_truncated_variant(store, name):
    onnx = variants.open_session(store, name)
    torch_sess = variants.open_session(store, name, backend="torch")
    for size in (32, 57, 224):  # exported at 32: the graph must serve any resolution
        x = np.random.default_rng(size).standard_normal((3, 3, size, size), np.float32)
        np.testing.assert_allclose(torch_sess.run(x), onnx.run(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parent", ["resnet10", "resnet10+prune0.5"])
def test_exit_backbone_is_the_parents_prefix_unchanged(store, parent):
    """Only the head trains, so the exit variant shares every backbone tensor with its parent."""
    exit_w = load_state_dict_file(store.get(f"{parent}+exit2").weights_path)
    parent_w = load_state_dict_file(store.get(parent).weights_path)
    backbone = [k for k in exit_w if not k.startswith("head.")]
    assert backbone and all(k.startswith(("conv1", "bn1", "layer1", "layer2")) for k in backbone)
    for k in backbone:
        assert exit_w[k].equal(parent_w[k]), k
    m = store.get(f"{parent}+exit2")
    assert m.metrics["recover_mode"] == "head" and m.metrics["recover_steps"] == 5
    assert m.params < store.get(parent).params


def test_resnet18_exit2_keeps_under_15_percent_of_params():
    _, built, module, arch = _exit("resnet18", 2, resolution=32)
    assert _params(module) <= 0.15 * _params(built.module)
    assert not hasattr(module, "layer3") and not hasattr(module, "fc")
    assert arch["exit"]["at"] == 2


def test_bert_encoder_exit_runs_in_both_backends(tmp_path):
    variants.generate("bert-tiny", tmp_path, exits=[1], recover_steps=3, calib="random",
                      seq_len=16)
    store = variants.Store(tmp_path)
    m = store.get("bert-tiny+exit1")
    assert m.arch["config"]["num_hidden_layers"] == 1
    assert m.arch["exit"]["head"] == "residual-linear"  # a layer head would equal the base
    assert m.params < store.get("bert-tiny").params
    assert m.metrics["fidelity_metric"] == "cosine"
    fam = variants.get_family("bert")
    for batch in (1, 4):
        ids, mask = fam.example_inputs(m.arch, batch, seq_len=6, seed=batch)
        assert variants.open_session(store, m.name).run([ids, mask]).shape == (batch, 6, 128)
    ids, mask = fam.example_inputs(m.arch, 2, seq_len=9)
    np.testing.assert_allclose(variants.open_session(store, m.name, backend="torch").run(
        [ids, mask]), variants.open_session(store, m.name).run([ids, mask]), rtol=1e-4,
        atol=1e-4)


def test_bert_exits_rebuild_from_arch():
    import torch

    for classes, shape in ((3, (2, 3)), (None, (2, 9, 256))):
        fam, built, module, arch = _exit("bert-mini", 2, num_classes=classes, seq_len=16)
        assert arch["config"]["num_hidden_layers"] == 2
        assert arch["exit"]["head"] == ("pooler-classifier" if classes else "final-layer")
        rebuilt = fam.rebuild(arch)
        rebuilt.load_state_dict(module.state_dict())
        inputs = fam.example_inputs(arch, 2, seq_len=9)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(*inputs), module(*inputs))
            assert module(*inputs).shape == shape


def test_pruned_bert_exit_rebuilds_from_arch():
    """Prune (3 of 4 heads: not a divisor of hidden 256), then cut with a layer-copy head."""
    import torch

    from variants import Prune

    fam = variants.get_family("bert")
    built = fam.build("bert-mini", seq_len=16)
    module, arch = copy.deepcopy(built.module), copy.deepcopy(built.arch)
    for spec in (Prune(0.25), EarlyExit(2)):
        ctx = TransformContext(family=fam, base=built.module, base_arch=built.arch,
                               calib=calibration(fam, built.arch, "random"), recover_steps=0)
        module, arch = torch_transform(spec)(module, spec, arch, ctx)
    assert arch["exit"]["head"] == "final-layer"
    assert module.head.layer.attention.self.num_attention_heads == 3
    rebuilt = fam.rebuild(arch)
    rebuilt.load_state_dict(module.state_dict())
    inputs = fam.example_inputs(arch, 2, seq_len=9)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*inputs), module.eval()(*inputs))


@pytest.mark.parametrize(("model", "at", "valid", "build"), [
    ("resnet10", 4, "1..3", {"num_classes": 10, "resolution": 32}),
    ("bert-tiny", 2, "1..1", {}),
])
def test_exit_beyond_depth_names_the_valid_range(tmp_path, model, at, valid, build):
    with pytest.raises(SpecError, match=valid.replace(".", r"\.")):
        variants.generate(model, tmp_path, exits=[at], **build)
    assert not (tmp_path / "variants" / model).exists()  # validated before any work


def test_exit_point_must_be_positive():
    with pytest.raises(SpecError, match=">= 1"):
        EarlyExit(0)


def test_exit_on_custom_model_without_exit_points_is_refused(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(SpecError, match="no early-exit points"):
        variants.generate("tiny", tmp_path, module=net, example_inputs=torch.randn(2, 4),
                          exits=[1])


def test_dynamic_exit_calibrates_thresholds_and_reports_exits(resnet10):
    import torch

    fam, built = resnet10
    cal = calibration(fam, built.arch, "digits")
    runner = build_dynamic_exit(built.module, fam, built.arch, cal, target_fidelity=0.99,
                                steps=5)
    assert runner.num_exits == 4 and len(runner.thresholds) == 3
    assert runner.calibration["fidelity"] >= 0.99
    assert sum(runner.calibration["exit_counts"].values()) == runner.calibration["samples"]
    x = cal.batches[0][0]
    out, exits = runner.run(x)
    assert out.shape == (len(x), 10) and exits.shape == (len(x),)
    assert set(exits.tolist()) <= {1, 2, 3, 4}
    with torch.no_grad():
        full = built.module(x)
    late = exits == 4
    torch.testing.assert_close(out[late], full[late])  # samples that ran through = full model
    stats = runner.stats()
    assert stats["samples"] == len(x) and sum(stats["exit_counts"].values()) == len(x)
    assert len(stats["heads"]) == 3 and stats["target_fidelity"] == 0.99


def test_dynamic_exit_thresholds_steer_every_sample(resnet10):
    import torch

    fam, built = resnet10
    stages, final = variants.early_exit.exit_adapter("resnet").stages(built.module, built.arch)
    heads = [variants.early_exit.exit_adapter("resnet").new_head(built.module, built.arch, k)
             for k in (1, 2, 3)]
    x = torch.randn(5, 3, 32, 32)
    never = DynamicEarlyExit(stages, [*heads, final])  # no thresholds: always the full model
    out, exits = never.run(x)
    assert exits.tolist() == [4] * 5
    with torch.no_grad():
        torch.testing.assert_close(out, built.module(x))
    always = DynamicEarlyExit(stages, [*heads, final], thresholds=[0.0, 0.0, 0.0])
    out, exits = always.run(x)
    assert exits.tolist() == [1] * 5
    with torch.no_grad():
        torch.testing.assert_close(out, heads[0](stages[0](x)))


def test_dynamic_exit_runs_per_stage_onnx_sessions(resnet10, tmp_path):
    import torch

    fam, built = resnet10
    stages, final = variants.early_exit.exit_adapter("resnet").stages(built.module, built.arch)
    heads = [variants.early_exit.exit_adapter("resnet").new_head(built.module, built.arch, k)
             for k in (1, 2, 3)]
    runner = DynamicEarlyExit(stages, [*heads, final], thresholds=[0.5, 0.3, 0.2])
    x = torch.randn(6, 3, 32, 32)
    runner.export_onnx(tmp_path, x[:2])
    ort = DynamicEarlyExit.from_onnx(tmp_path)
    (out, exits), (ort_out, ort_exits) = runner.run(x), ort.run(x)
    assert ort_exits.tolist() == exits.tolist()
    torch.testing.assert_close(ort_out, out, rtol=1e-4, atol=1e-4)


def test_dynamic_exit_needs_a_classifier():
    fam = variants.get_family("bert")
    built = fam.build("bert-tiny")
    with pytest.raises(SpecError, match="classifier"):
        build_dynamic_exit(built.module, fam, built.arch,
                           calibration(fam, built.arch, "random"))


def test_dynamic_exit_on_bert_classifier():
    fam = variants.get_family("bert")
    built = fam.build("bert-tiny", num_classes=3, seq_len=16)
    cal = calibration(fam, built.arch, "random", samples=32)
    runner = build_dynamic_exit(built.module, fam, built.arch, cal, target_fidelity=0.9, steps=3)
    assert runner.num_exits == 2
    out, exits = runner.run(cal.batches[0])
    assert out.shape == (16, 3) and set(exits.tolist()) <= {1, 2}


@pytest.mark.parametrize("model,build", [("resnet10", {"num_classes": 10, "resolution": 32}),
                                         ("bert-tiny", {}), ("bert-tiny", {"num_classes": 3})])
def test_exit_modules_are_module_level_classes(model, build):
    """Truncated models and their heads are classes a reader can import and pickle by name."""
    import importlib
    import pickle

    import torch

    fam = variants.family_of(model)
    built = fam.build(model, **build)
    inputs = fam.example_inputs(built.arch, 2, seq_len=8)
    exit_mod, _ = variants.early_exit.exit_adapter(fam.name).truncate(built.module, built.arch, 1)
    for m in (exit_mod, *exit_mod.modules()):
        cls = type(m)
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    clone = pickle.loads(pickle.dumps(exit_mod.eval()))
    with torch.no_grad():
        assert torch.equal(clone(*inputs), exit_mod(*inputs))
