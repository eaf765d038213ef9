"""VariantCache with shared memory: groups charged once, real pooled torch sessions.

The store holds two task models on one bert-tiny backbone (2 and 3 classes; the same seed
gives them the same backbone, as two heads fine-tuned on a frozen encoder would be) and
their exit@1 variants (heads briefly trained, so they differ from the layer they copy), which
share the embeddings and first layer with every other.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import variants
from adaptive.cache import VariantCache
from adaptive.errors import AdaptiveError
from adaptive.select import Candidate
from adaptive.sharing import SharedCandidate
from variants.shared import sharing_groups, tensor_index


@pytest.fixture(scope="module")
def task_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_store")
    for name, classes in (("task-a", 2), ("task-b", 3)):
        variants.generate("bert-tiny", root, name=name, num_classes=classes, exits=[1],
                          recover_steps=2, seed=0)
    return variants.Store(root)


def _ids(k: int = 0, batch: int = 1):
    rng = np.random.default_rng(k)
    ids = rng.integers(1000, 30000, (batch, 8)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _weights(store, variant: str) -> int:
    """Bytes of the variant's distinct tensors (equal ones, like fresh LayerNorm weights,
    are held once by the pool even within one model)."""
    return sum(k.nbytes for k in set(tensor_index(store.get(variant).weights_path).values()))


def _union(store, *names: str) -> int:
    """Bytes of the distinct tensors of several variants together."""
    keys = set()
    for n in names:
        keys |= set(tensor_index(store.get(n).weights_path).values())
    return sum(k.nbytes for k in keys)


def _common(store, a: str, b: str) -> int:
    """Bytes of the distinct tensors two variants have in common."""
    ka, kb = (set(tensor_index(store.get(n).weights_path).values()) for n in (a, b))
    return sum(k.nbytes for k in ka & kb)


EXTRA = 50_000  # invented activation bytes on top of each variant's weights


def _cands(store):
    return {m: [Candidate(m, _weights(store, m) + EXTRA, 0.95),
                Candidate(f"{m}+exit1", _weights(store, f"{m}+exit1") + EXTRA, 0.85)]
            for m in ("task-a", "task-b")}


def test_sharing_groups_find_the_backbone_and_the_prefix(task_store):
    idx = {v: tensor_index(task_store.get(v).weights_path)
           for v in ("task-a", "task-b", "task-a+exit1", "task-b+exit1")}
    sg = sharing_groups(idx)
    full = {v: sum(k.nbytes for k in set(i.values())) for v, i in idx.items()}
    for v in idx:  # every byte is private or in a group, once
        assert sg.standalone_bytes(v) == full[v]
    # the two full models share everything but their classifiers
    both = [g for g, users in sg.users.items() if users == {"task-a", "task-b"}]
    assert len(both) == 1
    assert sg.private["task-a"] < 0.05 * full["task-a"]
    # all four share the embeddings (and the first layer)
    everyone = [g for g, users in sg.users.items() if len(users) == 4]
    assert len(everyone) == 1 and sg.groups[everyone[0]] > 0.5 * full["task-a+exit1"]
    # tensor_index agrees with tensor_key on the loaded tensors
    from safetensors.torch import load_file

    from variants.shared import tensor_key
    loaded = load_file(str(task_store.get("task-a").weights_path))
    assert {n: tensor_key(t) for n, t in loaded.items()} == idx["task-a"]


def test_groups_are_charged_once_and_come_back_with_the_last_holder(task_store):
    """Accounting only: a fake loader, SharedCandidates and explicit groups."""
    loads = []

    def loader(manifest, device, backend, source):
        loads.append(manifest.name)
        return type("S", (), {"run": lambda self, x: manifest.name, "close": lambda self: None})()

    cands = {m: [SharedCandidate(m, 10, 0.95, groups={"backbone"}),
                 Candidate(f"{m}+exit1", 60, 0.85)] for m in ("task-a", "task-b")}
    seen = []
    cache = VariantCache(task_store, policy="memadapt-v1",
                         candidates=cands, groups={"backbone": 100}, budget=130,
                         loader=loader, audit=lambda r, b: seen.append((r, b)),
                         pin_allocator=False, verify=False)
    assert cache.infer("task-a", None).variant == "task-a"
    assert cache.resident_bytes() == 110
    # alone it would need 110 more; sharing the backbone it needs 10: both stay full
    assert cache.infer("task-b", None).variant == "task-b"
    assert cache.resident() == {"task-a": "task-a", "task-b": "task-b"}
    st = cache.stats()
    assert (st.bytes_resident, st.shared_bytes, st.evictions, st.downgrades) == (120, 100, 0, 0)
    # a drop to 80: the backbone cannot stay for one model alone (10 + 100 > 80), so both
    # go to their exit variants... which do not fit together (120): one is evicted
    cache.set_budget(80)
    assert cache.resident_bytes() <= 80
    assert len(cache.resident()) == 1 and set(cache.resident().values()) <= {
        "task-a+exit1", "task-b+exit1"}
    assert cache.stats().shared_bytes == 0
    cache.set_budget(130)  # back up: the plan with the shared backbone serves both full
    cache.rebalance(force=True)
    assert cache.resident() == {"task-a": "task-a", "task-b": "task-b"}
    assert cache.resident_bytes() == 120
    cache.close()
    assert cache.resident_bytes() == 0 and cache.stats().shared_bytes == 0
    assert all(r <= b for r, b in seen)


def test_without_sharing_the_second_model_pushes_the_first_down(task_store):
    def loader(manifest, device, backend, source):
        return type("S", (), {"run": lambda self, x: manifest.name, "close": lambda self: None})()

    cands = {m: [Candidate(m, 110, 0.95), Candidate(f"{m}+exit1", 20, 0.85)]
             for m in ("task-a", "task-b")}
    cache = VariantCache(task_store, policy="memadapt-v1",
                         candidates=cands, budget=130, loader=loader,
                         pin_allocator=False, verify=False)
    cache.infer("task-a", None)
    cache.infer("task-b", None)
    assert sorted(cache.resident().values()) in (["task-a", "task-b+exit1"],
                                                 ["task-a+exit1", "task-b"])
    cache.close()


def test_share_weights_holds_the_backbone_once_in_real_tensors(task_store):
    cands = _cands(task_store)
    a, b = (_weights(task_store, m) for m in ("task-a", "task-b"))
    sg = sharing_groups({m: tensor_index(task_store.get(m).weights_path)
                         for m in ("task-a", "task-b")})
    backbone = sum(sg.groups.values())
    budget = a + b - backbone + 2 * EXTRA + 1000  # both full only if the backbone is shared
    seen = []
    with VariantCache(task_store, policy="memadapt-v1",
                      backend="torch", candidates=cands, budget=budget,
                      share_weights=True, audit=lambda r, bb: seen.append((r, bb))) as cache:
        refs = {m: variants.open_session(task_store, m, backend="torch").run(_ids(3))
                for m in ("task-a", "task-b")}
        for m in ("task-a", "task-b"):
            out = cache.infer(m, _ids(3))
            assert out.variant == m
            np.testing.assert_allclose(out.output, refs[m], rtol=1e-5, atol=1e-6)
        assert cache.resident() == {"task-a": "task-a", "task-b": "task-b"}
        pool = cache.tensor_pool
        # the real tensors held: both models' weights with the backbone once (plus BERT's
        # non-persistent position/token-type id buffers, which are in no weights file)
        assert a + b - backbone <= pool.bytes() <= a + b - backbone + 65536
        assert cache.resident_bytes() == a + b - backbone + 2 * EXTRA
        # one model at its exit variant still holds the whole backbone with the other; only
        # both at exit1 fit this budget: the downgrades reuse the pooled prefix
        both_exit = _union(task_store, "task-a+exit1", "task-b+exit1") + 2 * EXTRA
        assert _union(task_store, "task-a", "task-b+exit1") + 2 * EXTRA > both_exit + 1000
        cache.set_budget(both_exit + 1000)
        assert cache.resident() == {"task-a": "task-a+exit1", "task-b": "task-b+exit1"}
        assert cache.resident_bytes() == both_exit
        assert pool.bytes() <= cache.resident_bytes() <= cache.budget
        assert cache.stats().downgrades == 2 and cache.stats().evictions == 0
        # (too tight for make-before-break: both full went first) the second exit load did
        # not read the prefix again
        read = sum(cache._models[m].current.session.read_bytes for m in ("task-a", "task-b"))
        assert read <= both_exit - 2 * EXTRA
        # back up: the upgrades read only the tails, the prefix stays pooled
        cache.set_budget(budget)
        assert cache.resident() == {"task-a": "task-a", "task-b": "task-b"}
        read = sum(cache._models[m].current.session.read_bytes for m in ("task-a", "task-b"))
        assert read <= _union(task_store, "task-a", "task-b") - _common(
            task_store, "task-a", "task-a+exit1")
        for m in ("task-a", "task-b"):  # still served, by what is resident
            assert cache.infer(m, _ids(4)).variant == m
    assert pool.bytes() == 0 and len(pool) == 0  # every session released its tensors
    assert all(r <= bb for r, bb in seen)


def test_shared_sessions_under_concurrent_swaps(task_store):
    """Requests on pooled sessions while the budget moves: no failure, no leak."""
    cands = _cands(task_store)
    full = sum(_weights(task_store, m) for m in ("task-a", "task-b")) + 2 * EXTRA
    small = _weights(task_store, "task-a+exit1") + EXTRA
    budgets = [full, small + 2 * EXTRA, full // 2, full]
    errors, stop = [], threading.Event()

    def client(m):
        k = 0
        while not stop.is_set():
            try:
                cache.infer(m, _ids(k))
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                if "no variant" not in str(e) and "fit" not in str(e):
                    errors.append(e)
            k += 1

    cache = VariantCache(task_store, policy="memadapt-v1",
                         backend="torch", candidates=cands, budget=full,
                         share_weights=True)
    threads = [threading.Thread(target=client, args=(m,)) for m in ("task-a", "task-b") * 2]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            for b in budgets:
                cache.set_budget(b)
                assert cache.resident_bytes() <= b
    finally:
        stop.set()
        for t in threads:
            t.join()
    pool = cache.tensor_pool
    cache.close()
    assert not errors, errors[:3]
    assert pool.bytes() == 0


def test_sharing_construction_errors(task_store):
    cands = _cands(task_store)
    from variants.backends import supports_pool

    if not supports_pool("onnxruntime"):
        with pytest.raises(AdaptiveError, match="shared tensor pool"):
            VariantCache(task_store, candidates=cands, budget="1GiB", share_weights=True)
    with pytest.raises(AdaptiveError, match="drop loader="):
        VariantCache(task_store, backend="torch", candidates=cands, budget="1GiB",
                     share_weights=True, loader=lambda *a: None)
    bad = {"task-a": [SharedCandidate("task-a", 10, 0.9, groups={"nope"})]}
    with pytest.raises(AdaptiveError, match="nope"):
        VariantCache(task_store, candidates=bad, budget=1000, groups={"other": 5})
    with pytest.raises(AdaptiveError, match="non-negative"):
        VariantCache(task_store, candidates=bad, budget=1000, groups={"nope": -1})
