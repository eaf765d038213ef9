"""Shared memory: selection with shared groups (vs brute force), the tensor pool, and
in-place downgrade/upgrade between a full model and its exit@k variant."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive.select import Candidate, ModelDemand
from adaptive.sharing import SharedCandidate, plan_groups, select_shared, shared_memory

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
GROUPS = ("g0", "g1", "g2")


# ---- selection -------------------------------------------------------------------------------

@st.composite
def instances(draw):
    groups = {g: draw(st.integers(0, 60)) for g in GROUPS[:draw(st.integers(0, 3))]}
    demands = []
    for m in range(draw(st.integers(1, 3))):
        cands = []
        for v in range(draw(st.integers(0, 3))):
            needs = draw(st.sets(st.sampled_from(sorted(groups)))) if groups else set()
            cands.append(SharedCandidate(f"v{v}", draw(st.integers(0, 50)),
                                         draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])),
                                         groups=needs))
        demands.append(ModelDemand(f"m{m}", cands, floor=draw(st.sampled_from([0.0, 0.5])),
                                   rate=draw(st.sampled_from([0.0, 1.0, 2.0, 3.0]))))
    return demands, groups, draw(st.integers(0, 150))


def _brute(demands, groups, budget, objective):
    options = [[None, *d.eligible()] if d.rate > 0 else [None] for d in demands]
    best = None
    for combo in itertools.product(*options):
        details = {d.model: c for d, c in zip(demands, combo)}
        if shared_memory(details, groups) > budget:
            continue
        util = math.fsum(d.rate * c.accuracy for d, c in zip(demands, combo) if c)
        served = math.fsum(d.rate for d, c in zip(demands, combo) if c)
        value = (served, util) if objective == "misses" else (util,)
        best = value if best is None or value > best else best
    return best


@SETTINGS
@given(instances(), st.sampled_from(["accuracy", "misses"]))
def test_select_shared_matches_brute_force(inst, objective):
    demands, groups, budget = inst
    plan = select_shared(demands, groups, budget, objective=objective)
    # feasible, one per model, floors, rate-0 models never resident
    assert set(plan.choice) == {d.model for d in demands}
    assert plan.memory_bytes == shared_memory(plan.details, groups) <= budget
    for d in demands:
        c = plan.details[d.model]
        assert (c is None) == (plan.choice[d.model] is None)
        if c is not None:
            assert c in d.candidates and c.accuracy >= d.floor and d.rate > 0
    assert plan.exact
    value = (plan.served_rate, plan.utility) if objective == "misses" else (plan.utility,)
    assert value == pytest.approx(_brute(demands, groups, budget, objective), abs=1e-9)


@SETTINGS
@given(instances())
def test_local_search_is_feasible(inst):
    demands, groups, budget = inst
    plan = select_shared(demands, groups, budget, max_exact_groups=0)
    assert plan.memory_bytes == shared_memory(plan.details, groups) <= budget
    assert all(c is None or c.accuracy >= d.floor for d in demands
               for c in [plan.details[d.model]])


def test_shared_backbone_is_charged_once():
    groups = {"minilm": 90}
    demands = [ModelDemand(m, [SharedCandidate("full", 1, 0.9, groups=["minilm"]),
                               Candidate("small", 60, 0.5)]) for m in ("a", "b")]
    plan = select_shared(demands, groups, 95)
    assert plan.choice == {"a": "full", "b": "full"} and plan.memory_bytes == 92
    assert plan_groups(plan) == {"minilm"}
    # without sharing, only one could use the backbone
    alone = select_shared(demands, groups, 89)
    assert alone.choice == {"a": None, "b": None} or alone.memory_bytes <= 89


def test_select_shared_rejects_unknown_groups():
    d = ModelDemand("a", [SharedCandidate("v", 1, 0.5, groups=["nope"])])
    with pytest.raises(ValueError, match="unknown groups"):
        select_shared([d], {"g": 1}, 10)
    with pytest.raises(ValueError, match="string"):
        SharedCandidate("v", 1, 0.5, groups="g")


# ---- tensor pool -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_task_models(tmp_path_factory):
    """Two bert-tiny classifiers (2 and 3 classes) on one frozen encoder."""
    import torch
    from safetensors.torch import save_file

    from variants.families import get_family

    fam = get_family("bert")
    torch.manual_seed(0)
    a = fam.build("bert-tiny", num_classes=2)
    b = fam.build("bert-tiny", num_classes=3)
    b.module.model.bert.load_state_dict(a.module.model.bert.state_dict())
    root = tmp_path_factory.mktemp("shared")
    paths = []
    for name, built in (("a", a), ("b", b)):
        p = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in built.module.state_dict().items()}, str(p))
        paths.append(p)
    return fam, a, b, paths


def test_pool_holds_a_shared_backbone_once(two_task_models):
    import torch

    from variants.shared import TensorPool, module_tensors, tensor_bytes

    fam, a, b, (pa, pb) = two_task_models
    ids, mask = fam.example_inputs(a.arch, 2, seq_len=8)
    ref_a, ref_b = a.module(ids, mask), b.module(ids, mask)
    backbone = sum(tensor_bytes(t) for t in a.module.model.bert.state_dict().values())
    head = {n: sum(tensor_bytes(t) for t in m.module.model.classifier.state_dict().values())
            for n, m in (("a", a), ("b", b))}
    pool = TensorPool()
    ma, ha = pool.load(fam.name, a.arch, pa, name="a")
    mb, hb = pool.load(fam.name, b.arch, pb, name="b")
    assert torch.equal(ma(ids, mask), ref_a) and torch.equal(mb(ids, mask), ref_b)
    ta, tb = module_tensors(ma), module_tensors(mb)
    assert ta["model.bert.encoder.layer.0.attention.self.query.weight"] is not \
        tb["model.bert.encoder.layer.0.attention.self.query.weight"]  # own Parameters ...
    assert ta["model.bert.encoder.layer.0.attention.self.query.weight"].data_ptr() == \
        tb["model.bert.encoder.layer.0.attention.self.query.weight"].data_ptr()  # one storage
    # one backbone (+ small non-persistent buffers) and two heads; random-init LayerNorm
    # weights (all ones) and biases (zeros) are identical inside one model too
    assert 0.9 * backbone < pool.bytes() <= backbone * 1.01 + sum(head.values())
    cost = pool.transition_cost([ha], hb)
    assert cost.freed_bytes == head["a"] and cost.needed_bytes == 0
    assert pool.transition_cost([], ha).needed_bytes == 0
    before = pool.bytes()
    assert pool.release(ha) == head["a"] == before - pool.bytes()
    with pytest.raises(ValueError, match="already released"):
        pool.release(ha)
    assert torch.equal(mb(ids, mask), ref_b)  # b lost nothing
    assert pool.release(hb) > 0.9 * backbone and pool.bytes() == 0


def test_pool_add_dedups_built_modules_in_place(two_task_models):
    import torch

    from variants.shared import TensorPool

    fam, a, b, _ = two_task_models
    ids, mask = fam.example_inputs(a.arch, 2, seq_len=8)
    ma, mb = copy.deepcopy(a.module), copy.deepcopy(b.module)
    ref = mb(ids, mask)
    pool = TensorPool()
    _, ha = pool.add(ma)
    size_a = pool.bytes()
    _, hb = pool.add(mb)
    assert pool.bytes() - size_a < 0.05 * size_a  # only b's head is new
    assert torch.equal(mb(ids, mask), ref)
    assert ma.model.bert.embeddings.word_embeddings.weight.data_ptr() == \
        mb.model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert pool.transition_cost([ha, hb], []).freed_bytes == pool.bytes()


# ---- in-place downgrade / upgrade ------------------------------------------------------------

@pytest.fixture(scope="module", params=["resnet", "bert"])
def full_and_exit(request, tmp_path_factory):
    """A full model and its exit@2 variant (head trained-looking: perturbed), stored as
    safetensors. Built with the exit adapter directly, not with ``variants.generate``:
    the truncation is the same code and this keeps the test independent of training."""
    import torch
    from safetensors.torch import save_file

    from variants.early_exit import exit_adapter
    from variants.families import get_family

    fam = get_family(request.param)
    torch.manual_seed(0)
    built = fam.build("resnet10", num_classes=10, resolution=32) if fam.name == "resnet" \
        else fam.build("bert-mini", num_classes=3)
    with torch.no_grad():  # non-default BatchNorm statistics: a buffer not loaded shows
        for name, buf in built.module.named_buffers():
            if "running_" in name:
                buf.uniform_(0.5, 1.5)
    exit_mod, exit_arch = exit_adapter(fam.name).truncate(copy.deepcopy(built.module),
                                                           built.arch, 2)
    with torch.no_grad():
        for p in exit_mod.head_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp(f"exit-{fam.name}")
    files = {}
    for name, m in (("full", built.module), ("exit", exit_mod)):
        files[name] = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(files[name]))
    return fam, built, exit_mod.eval(), exit_arch, files


def test_downgrade_in_place_equals_truncated_module(full_and_exit, monkeypatch):
    import builtins

    import safetensors
    import torch

    from variants.shared import downgrade_in_place, load_exit_head, module_tensors

    fam, built, exit_ref, exit_arch, files = full_and_exit
    full = copy.deepcopy(built.module)
    inputs = fam.example_inputs(built.arch, 2, seq_len=8)
    head = load_exit_head(fam.name, exit_arch, files["exit"])
    before = module_tensors(full)
    prefix = {n: t for n, t in before.items() if n not in head}

    def no_files(*a, **k):
        raise AssertionError("downgrade opened a file")

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", no_files)
        m.setattr(safetensors, "safe_open", no_files)
        small, freed = downgrade_in_place(full, fam.name, exit_arch, head)
    with torch.no_grad():
        assert torch.allclose(small(*inputs), exit_ref(*inputs), atol=1e-5)
    shared = [n for n, t in module_tensors(small).items() if prefix.get(n) is t]
    assert len(shared) > 0.5 * len(module_tensors(small))  # prefix reused, not copied
    def unique_bytes(ts):
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in ts}.values())

    kept = [prefix[n] for n in shared]
    assert freed == unique_bytes(before.values()) - unique_bytes(kept) > 0
    assert all(t.device.type == "meta" for n, t in module_tensors(full).items()
               if n not in module_tensors(small))


def test_upgrade_reads_only_the_tail(full_and_exit, monkeypatch):
    import safetensors
    import torch

    from variants import shared
    from variants.shared import (
        downgrade_in_place,
        exit_head_keys,
        load_exit_head,
        module_tensors,
        upgrade_in_place,
    )

    fam, built, exit_ref, exit_arch, files = full_and_exit
    inputs = fam.example_inputs(built.arch, 2, seq_len=8)
    with torch.no_grad():
        ref = built.module(*inputs)
    head = load_exit_head(fam.name, exit_arch, files["exit"])
    small, _ = downgrade_in_place(copy.deepcopy(built.module), fam.name, exit_arch, head)
    read_keys = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, k):
            read_keys.append(k)
            return self._f.get_tensor(k)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    head_keys = exit_head_keys(fam.name, exit_arch)
    full, read = upgrade_in_place(small, fam.name, built.arch, files["full"], head_keys)
    with torch.no_grad():
        assert torch.allclose(full(*inputs), ref, atol=1e-5)
    kept = {n for n in module_tensors(small) if n not in head_keys}
    all_keys = set(built.module.state_dict())
    assert sorted(read_keys) == read == sorted(all_keys - kept)
    assert 0 < len(read) < len(all_keys)
    if fam.name == "resnet":
        assert all(k.startswith(("layer3.", "layer4.", "fc.")) for k in read)
    else:  # layers 2.. and the full model's own pooler and classifier
        assert all(".encoder.layer.2." in k or ".encoder.layer.3." in k or ".pooler." in k
                   or "classifier" in k for k in read)
    assert shared.module_tensors(full)  # still a whole module
