"""VariantCache and budget sources on real tiny ONNX variants with made-up profiles.

The store holds resnet10 (+int8, +fp16), bert-tiny (+int8) and resnet10b (+fp16); the
candidates give them invented memory and accuracy figures so small budgets force swaps.
"""

from __future__ import annotations

import random
import shutil
import sys
import threading
import time
import types

import numpy as np
import pytest

import variants
from adaptive import InfeasibleBudget
from adaptive.admission import ReplanSchedule
from adaptive.budget import (
    BudgetError,
    BudgetSource,
    CallableBudget,
    CgroupBudget,
    CudaFreeBudget,
    FixedBudget,
    as_budget,
    list_budget_sources,
)
from adaptive.cache import UnknownModelError, VariantCache, catalog_candidates
from adaptive.errors import AdaptiveError
from adaptive.select import Candidate

CANDS = {
    "resnet10": [Candidate("resnet10", 400, 0.95), Candidate("resnet10+fp16", 250, 0.94),
                 Candidate("resnet10+int8", 120, 0.90)],
    "bert-tiny": [Candidate("bert-tiny", 300, 0.92), Candidate("bert-tiny+int8", 100, 0.88)],
    "resnet10b": [Candidate("resnet10b", 350, 0.93), Candidate("resnet10b+fp16", 200, 0.92)],
}
EVERYTHING = 10_000  # every model at its largest variant fits
SMALLEST_SET = 120 + 100 + 200  # every model at its smallest variant


def wait_until(pred, timeout: float = 30.0) -> bool:
    """Poll ``pred`` until it holds (for states other threads reach); False on timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="session")
def store(tiny_store, tmp_path_factory):
    """The shared tiny store's variants plus a third model, in a store of our own."""
    root = tmp_path_factory.mktemp("cache_store")
    shutil.copytree(tiny_store.root / "variants", root / "variants")
    variants.generate("resnet10", root, name="resnet10b", quantize=["fp16"], num_classes=10,
                      resolution=32, seed=1)
    return variants.Store(root)


def _inputs(model: str, k: int):
    rng = np.random.default_rng(1000 + k)
    if model.startswith("resnet"):
        return rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(1000, 30000, (1, 8)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


INPUTS = {m: [_inputs(m, k) for k in range(2)] for m in CANDS}


@pytest.fixture(scope="session")
def refs(store):
    """Every variant's own output for every test input, from a plain session."""
    out = {}
    for model, cands in CANDS.items():
        for c in cands:
            sess = variants.open_session(store, c.variant, threads=1, verify=False)
            for k, x in enumerate(INPUTS[model]):
                out[c.variant, k] = sess.run(x)
    return out


def make(store, budget=EVERYTHING, **kw) -> VariantCache:
    kw.setdefault("candidates", CANDS)
    kw.setdefault("threads", 1)
    kw.setdefault("verify", False)
    kw.setdefault("clock", FakeClock())
    return VariantCache(store, budget=budget, **kw)


def check(res, refs, k=0):
    np.testing.assert_allclose(res.output, refs[res.variant, k], rtol=1e-5, atol=1e-6)


# --- serving ---------------------------------------------------------------------------------

def test_hits_cold_loads_and_stats(store, refs):
    with make(store, verify=True) as cache:
        r1 = cache.infer("resnet10", INPUTS["resnet10"][0])
        r2 = cache.infer("resnet10", INPUTS["resnet10"][1])
        r3 = cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
        assert (r1.cold, r2.cold, r3.cold) == (True, False, True)
        assert (r1.variant, r3.variant) == ("resnet10", "bert-tiny")  # best variants fit
        check(r1, refs)
        check(r2, refs, 1)
        check(r3, refs)
        s = cache.stats()
        assert (s.requests, s.hits, s.misses, s.failures, s.cold_loads) == (3, 1, 2, 0, 2)
        assert (s.swaps, s.evictions) == (0, 0)
        assert s.bytes_resident == cache.resident_bytes() == 700
        assert s.budget_bytes == EVERYTHING
        m = s.models["resnet10"]
        assert (m.variant, m.accuracy, m.requests, m.hits, m.memory_bytes) == \
            ("resnet10", 0.95, 2, 1, 400)
        assert m.served_accuracy == pytest.approx(0.95)
        assert s.models["resnet10b"].variant is None and s.models["resnet10b"].requests == 0
        assert cache.resident() == {"resnet10": "resnet10", "bert-tiny": "bert-tiny"}
    assert cache.resident_bytes() == 0
    with pytest.raises(AdaptiveError, match="closed"):
        cache.infer("resnet10", INPUTS["resnet10"][0])
    with pytest.raises(AdaptiveError, match="closed"):
        cache.set_budget(1)
    cache.close()  # idempotent


@pytest.mark.parametrize("variant", [c.variant for cs in CANDS.values() for c in cs])
def test_output_is_the_variants_own(store, refs, variant):
    model = variant.split("+")[0]
    cache = make(store, candidates={model: [Candidate(variant, 1, 1.0)]})
    for k, x in enumerate(INPUTS[model]):
        res = cache.infer(model, x)
        assert res.variant == variant
        np.testing.assert_array_equal(res.output, refs[variant, k])
    cache.close()


def test_unknown_model_lists_known(store):
    cache = make(store)
    with pytest.raises(UnknownModelError) as e:
        cache.infer("resnet99", INPUTS["resnet10"][0])
    assert isinstance(e.value, KeyError) and isinstance(e.value, AdaptiveError)
    assert "resnet99" in str(e.value) and "bert-tiny, resnet10, resnet10b" in str(e.value)
    cache.close()


def test_batch_above_max_batch_is_refused(store):
    cache = make(store, max_batch=2)
    x = np.zeros((3, 3, 32, 32), np.float32)
    with pytest.raises(AdaptiveError, match="max_batch=2"):
        cache.infer("resnet10", x)
    assert cache.infer("resnet10", x[:2]).output.shape[0] == 2
    cache.close()


def test_floors_are_never_violated(store, refs):
    floors = {"resnet10": 0.93}  # resnet10+int8 (0.90, 120 bytes) is below it
    cache = make(store, budget=200, floors=floors)
    with pytest.raises(InfeasibleBudget) as e:  # int8 would fit, but is below the floor
        cache.infer("resnet10", INPUTS["resnet10"][0])
    msg = str(e.value)
    assert "'resnet10'" in msg and "'resnet10+fp16'" in msg and "250 bytes" in msg \
        and "200 bytes" in msg and "0.93" in msg
    assert (e.value.model, e.value.smallest_variant, e.value.budget_bytes) == \
        ("resnet10", "resnet10+fp16", 200)
    assert cache.stats().failures == 1 and cache.resident_bytes() == 0

    cache.set_budget(EVERYTHING)
    assert cache.infer("resnet10", INPUTS["resnet10"][0]).variant == "resnet10"
    cache.set_budget(260)  # a drop: resnet10 goes to fp16, never to int8
    assert cache.resident() == {"resnet10": "resnet10+fp16"}
    res = cache.infer("resnet10", INPUTS["resnet10"][1])
    assert res.variant == "resnet10+fp16" and not res.cold
    check(res, refs, 1)
    cache.close()

    strict = make(store, floors={"bert-tiny": 0.99})
    with pytest.raises(InfeasibleBudget, match="no variant with accuracy >= its floor 0.99"):
        strict.infer("bert-tiny", INPUTS["bert-tiny"][0])
    strict.close()


def test_downgrade_on_budget_drop_keeps_models_served(store, refs):
    audit = []
    cache = make(store, policy="memadapt-v1",
                 audit=lambda used, budget: audit.append((used, budget)))
    for m in CANDS:
        cache.infer(m, INPUTS[m][0])
    assert cache.resident_bytes() == 1050
    cache.set_budget("700B")
    assert cache.budget == 700 and cache.resident_bytes() <= 700
    s = cache.stats()
    assert set(cache.resident()) == set(CANDS)  # downgraded, nothing evicted
    assert s.downgrades >= 1 and s.evictions == 0
    for m in CANDS:
        res = cache.infer(m, INPUTS[m][1])
        assert not res.cold
        check(res, refs, 1)
    assert all(used <= budget for used, budget in audit)
    cache.close()


def test_budget_rise_upgrades_at_once_whatever_the_hysteresis(store):
    cache = make(store, policy="memadapt-v1", budget=SMALLEST_SET, hysteresis=0.5)
    for m in CANDS:
        cache.infer(m, INPUTS[m][0])
    small = {"resnet10": "resnet10+int8", "bert-tiny": "bert-tiny+int8",
             "resnet10b": "resnet10b+fp16"}
    assert cache.resident() == small
    # hysteresis damps re-plans on drifting rates; a raised budget is an event: a few points
    # of accuracy (far below the 50% hysteresis) are taken at once
    cache.set_budget(EVERYTHING)
    assert cache.resident() == {m: m for m in CANDS}
    s = cache.stats()
    assert s.upgrades == 3 and s.bytes_resident == 1050
    assert not cache.rebalance()  # nothing left to gain
    cache.set_budget(SMALLEST_SET)  # and back down: downgrades, never over the budget
    assert cache.resident() == small and cache.resident_bytes() <= SMALLEST_SET
    cache.close()


def test_cold_load_downgrades_others_before_evicting(store):
    cache = make(store, policy="memadapt-v1", budget=700)
    cache.infer("resnet10", INPUTS["resnet10"][0])
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    assert cache.resident_bytes() == 700
    res = cache.infer("resnet10b", INPUTS["resnet10b"][0])
    assert res.cold
    s = cache.stats()
    assert set(cache.resident()) == set(CANDS) and s.evictions == 0 and s.downgrades >= 1
    assert cache.resident_bytes() <= 700
    cache.close()

    tight = make(store, policy="memadapt-v1", budget=SMALLEST_SET - 20)  # the three cannot all stay
    for m in CANDS:
        tight.infer(m, INPUTS[m][0])
    s = tight.stats()
    assert s.evictions == 1 and len(tight.resident()) == 2 and s.failures == 0
    assert tight.resident_bytes() <= SMALLEST_SET - 20
    tight.set_budget(EVERYTHING)  # the evicted model was asked for: the re-plan loads it
    s = tight.stats()
    assert set(tight.resident()) == set(CANDS) and s.prefetches == 1
    tight.close()


def test_rates_follow_the_fake_clock_and_drive_rebalance(store):
    clock = FakeClock()
    cache = make(store, policy="memadapt-v1",
                 budget=550, hysteresis=0.0, ewma_halflife_s=10.0, clock=clock)
    for _ in range(10):
        cache.infer("resnet10", INPUTS["resnet10"][0])
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    r = cache.stats().models
    assert r["resnet10"].rate == pytest.approx(10 * np.log(2) / 10)
    assert r["resnet10b"].rate == 0.0
    # resnet10 is hot: it keeps its best variant, bert-tiny takes the small one
    assert cache.resident() == {"resnet10": "resnet10", "bert-tiny": "bert-tiny+int8"}
    assert not cache.rebalance()  # already the best plan

    clock.t = 10.0
    assert cache.stats().models["resnet10"].rate == pytest.approx(5 * np.log(2) / 10)
    clock.t = 100.0  # resnet10 goes quiet, bert-tiny gets busy
    for _ in range(10):
        cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    assert cache.rebalance()
    assert cache.resident() == {"resnet10": "resnet10+fp16", "bert-tiny": "bert-tiny"}
    s = cache.stats()
    assert s.downgrades == 1 and s.upgrades == 1 and s.bytes_resident == 550
    cache.close()


def test_background_thread_rebalances_on_its_interval(store):
    clock = FakeClock()
    cache = make(store, policy="memadapt-v1",
                 budget=550, hysteresis=0.0, ewma_halflife_s=10.0, clock=clock,
                 rebalance_interval_s=0.01)
    for _ in range(10):
        cache.infer("resnet10", INPUTS["resnet10"][0])
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    clock.t = 100.0
    for _ in range(10):
        cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    with cache:
        assert wait_until(lambda: cache.resident().get("bert-tiny") == "bert-tiny")
        assert cache.stats().rebalances >= 1 and cache.resident_bytes() <= 550


def test_hysteresis_skips_small_gains(store):
    clock = FakeClock()
    cache = make(store, policy="memadapt-v1",
                 budget=550, hysteresis=0.5, clock=clock, ewma_halflife_s=10.0)
    for _ in range(10):
        cache.infer("resnet10", INPUTS["resnet10"][0])
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    before = cache.resident()
    clock.t = 100.0
    for _ in range(10):
        cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    assert not cache.rebalance() and cache.resident() == before
    cache.set_budget(450)  # now the residency is over budget: re-planned regardless
    assert cache.resident_bytes() <= 450 and cache.stats().downgrades >= 1
    cache.close()


def _recording_loader(sources):
    from variants.backends import get_backend

    def loader(manifest, device, backend, source):
        sources.append((manifest.name, source))
        return get_backend(backend)(manifest, device=device, threads=1, source=source)

    return loader


def _host_size(store, variant):
    from variants.backends import host_form, host_nbytes

    return host_nbytes(host_form(store.get(variant), "onnxruntime", "cpu"))


def test_keep_host_bytes_reloads_from_memory(store, refs):
    sources = []
    cache = make(store, policy="memadapt-v1", keep_host_bytes=True, host_budget="1GiB",
                 loader=_recording_loader(sources))
    cache.infer("resnet10", INPUTS["resnet10"][0])
    size = _host_size(store, "resnet10")
    assert cache.stats().host_bytes == size
    cache.set_budget(300)  # resnet10 goes to fp16 (its host form joins the tier)
    cache.set_budget(EVERYTHING)
    cache.rebalance(force=True)  # back to the base: from host memory, not the file
    res = cache.infer("resnet10", INPUTS["resnet10"][1])
    assert res.variant == "resnet10"
    check(res, refs, 1)
    assert [name for name, _ in sources] == ["resnet10", "resnet10+fp16", "resnet10"]
    assert all(src is not None for _, src in sources)
    assert sources[2][1] is sources[0][1]  # the very host form kept from the first load
    assert cache.stats().host_bytes == size + _host_size(store, "resnet10+fp16")
    cache.close()
    assert cache.stats().host_bytes == 0


def test_host_budget_bounds_the_host_tier(store):
    sources = []
    size, small = _host_size(store, "resnet10"), _host_size(store, "resnet10+fp16")
    cache = make(store, policy="memadapt-v1", keep_host_bytes=True,
                 host_budget=size + small - 1, loader=_recording_loader(sources))
    cache.infer("resnet10", INPUTS["resnet10"][0])
    cache.set_budget(300)  # fp16 joins the host tier; both do not fit: the older goes
    assert cache.stats().host_bytes == small
    cache.set_budget(EVERYTHING)
    cache.rebalance(force=True)
    assert [name for name, _ in sources] == ["resnet10", "resnet10+fp16", "resnet10"]
    assert sources[2][1] is not sources[0][1]  # read from the file again
    assert cache.stats().host_bytes <= size + small - 1
    cache.close()
    with pytest.raises(AdaptiveError, match="keep_host_bytes=True"):
        make(store, host_budget="1GiB")
    with pytest.raises(AdaptiveError, match="host_budget"):
        make(store, keep_host_bytes=True, host_budget="lots")


def test_host_tier_without_its_own_budget_is_charged_and_gives_way(store, refs):
    """Without host_budget the tier shares the budget: its bytes are charged, and dropped
    before a load waits for memory."""
    sources = []
    size = _host_size(store, "resnet10")
    cands = {"resnet10": [Candidate("resnet10", size, 0.95)],
             "bert-tiny": [Candidate("bert-tiny", size, 0.92)]}
    audit = []
    cache = make(store, candidates=cands, budget=3 * size, keep_host_bytes=True, policy="lru",
                 loader=_recording_loader(sources), audit=lambda u, b: audit.append((u, b)))
    check(cache.infer("resnet10", INPUTS["resnet10"][0]), refs)
    assert cache.stats().host_bytes == size and cache.resident_bytes() == 2 * size
    check(cache.infer("bert-tiny", INPUTS["bert-tiny"][0]), refs)  # the host entry gives way
    assert cache.stats().host_bytes <= size and cache.resident_bytes() <= 3 * size
    assert all(used <= budget for used, budget in audit)
    cache.close()
    assert cache.resident_bytes() == 0


# --- the simulator's decisions ----------------------------------------------------------------

class _Null:
    """A session that costs nothing: for checking decisions, not outputs."""

    def run(self, inputs):
        return None

    def close(self):
        pass


def test_aliases_serve_many_models_from_one_base(store, refs):
    cands = {"a": CANDS["resnet10"], "b": CANDS["resnet10"], "c": CANDS["bert-tiny"]}
    aliases = {"a": "resnet10", "b": "resnet10", "c": "bert-tiny"}
    cache = make(store, policy="memadapt-v1", budget=700, candidates=cands, aliases=aliases)
    for m in ("a", "b"):
        check(cache.infer(m, INPUTS["resnet10"][0]), refs)
    check(cache.infer("c", INPUTS["bert-tiny"][0]), refs)
    # each alias has its own session and memory: three models do not fit at their best
    assert set(cache.resident()) == {"a", "b", "c"} and cache.resident_bytes() <= 700
    assert cache.stats().downgrades >= 1
    cache.close()
    with pytest.raises(AdaptiveError, match="belongs to model 'bert-tiny', not 'resnet10'"):
        make(store, candidates={"a": CANDS["bert-tiny"]}, aliases={"a": "resnet10"})
    with pytest.raises(AdaptiveError, match="no candidates"):
        make(store, candidates=cands, aliases={"zzz": "resnet10"})


def test_schedule_replans_on_requests_in_clock_time(store):
    clock = FakeClock()
    schedule = ReplanSchedule(tick_s=10.0, min_interval_s=0.0, max_interval_s=1000.0, drift=0.25)
    cache = make(store, policy="memadapt-v1",
                 budget=550, hysteresis=0.0, ewma_halflife_s=10.0, clock=clock,
                 loader=lambda *a: _Null(), schedule=schedule)
    for _ in range(10):
        cache.infer("resnet10", None)
    cache.infer("bert-tiny", None)
    assert cache.resident() == {"resnet10": "resnet10", "bert-tiny": "bert-tiny+int8"}
    clock.t = 100.0  # bert-tiny gets busy; the first request after the tick re-plans
    cache.infer("bert-tiny", None)
    assert cache.resident() == {"resnet10": "resnet10+fp16", "bert-tiny": "bert-tiny"}
    assert cache.stats().rebalances == 1
    cache.close()


def test_without_prefetch_a_replan_loads_nothing(store):
    cache = make(store, policy="memadapt-v1",
                 budget=SMALLEST_SET - 20, prefetch=False, hysteresis=0.0,
                 loader=lambda *a: _Null())
    for m in CANDS:
        cache.infer(m, None)
    assert len(cache.resident()) == 2
    cache.set_budget(EVERYTHING)
    s = cache.stats()
    assert len(cache.resident()) == 2 and s.prefetches == 0 and s.upgrades == 2
    cache.close()


@pytest.mark.parametrize("kind", ["zipf", "bursty"])
def test_decisions_match_the_simulators_memadapt(store, kind):
    """Driven by the same trace, clock and budget changes, the cache makes exactly the
    simulator's memadapt-v1 decisions (the rules the cache runs): misses, evictions,
    downgrades, upgrades."""
    from adaptive.policies import get_policy
    from adaptive.select import ModelDemand
    from adaptive.simulate import simulate
    from adaptive.traces import BudgetTrace, synth

    bases = list(CANDS)
    names = [f"m{i}" for i in range(9)]
    cands = {n: CANDS[bases[i % 3]] for i, n in enumerate(names)}
    aliases = {n: bases[i % 3] for i, n in enumerate(names)}
    floors = {"m0": 0.93, "m4": 0.9}
    demands = [ModelDemand(n, cands[n], floor=floors.get(n, 0.0)) for n in names]
    tr = synth(kind, names, 3000, seed=3, duration_s=1800)
    budget = BudgetTrace(np.array([0.0, 400.0, 800.0, 1200.0, 1500.0]),
                         np.array([2000, 900, 1500, 3200, 700]))
    pol = get_policy("memadapt-v1")
    sim = simulate(tr, demands, pol, budget)
    assert sim.rejected == 0

    clock = FakeClock()
    cache = make(store, policy="memadapt-v1",
                 budget=2000, candidates=cands, aliases=aliases, floors=floors,
                 loader=lambda *a: _Null(), clock=clock, ewma_halflife_s=pol.tau_s * np.log(2),
                 hysteresis=pol.gain, prefetch=pol.prefetch, schedule=pol.schedule)
    changes = list(zip(budget.timestamps.tolist()[1:], budget.budget_bytes.tolist()[1:]))
    for t, k in zip(tr.timestamps.tolist(), tr.model.tolist()):
        while changes and t >= changes[0][0]:
            clock.t, b = changes.pop(0)
            cache.set_budget(b)
            assert cache.resident_bytes() <= b
        clock.t = t
        cache.infer(tr.models[k], None)
    s = cache.stats()
    cache.close()
    assert s.failures == 0
    assert (s.misses, s.evictions) == (sim.misses, sim.evictions)
    assert (s.downgrades, s.upgrades) == (sim.policy_stats["downgrades"],
                                          sim.policy_stats["upgrades"])
    assert s.downgrades > 0 and s.evictions > 0 and s.upgrades > 0


# --- concurrency -----------------------------------------------------------------------------

class _Gate:
    """A session wrapper whose run waits for a gate and which records its close."""

    def __init__(self, inner, gate: threading.Event, started: threading.Event):
        self.inner, self.gate, self.started = inner, gate, started
        self.closed = False
        self.ran_after_close = False

    def run(self, inputs):
        self.started.set()
        self.gate.wait(30)
        self.ran_after_close |= self.closed
        return self.inner.run(inputs)

    def close(self):
        self.closed = True


def test_one_load_for_many_waiters_and_hits_go_on(store, refs):
    gate, calls = threading.Event(), []
    entered = threading.Event()

    def loader(manifest, device, backend, source_bytes):
        calls.append(manifest.name)
        if manifest.base == "resnet10":
            entered.set()
            gate.wait(30)
        return variants.open_session(store, manifest.name, threads=1, verify=False)

    cache = make(store, loader=loader)
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    results, errors = [], []

    def ask():
        try:
            results.append(cache.infer("resnet10", INPUTS["resnet10"][0]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    assert entered.wait(30)
    assert wait_until(lambda: cache.stats().models["resnet10"].requests == 4)
    # resnet10 is loading (and holds the planner): a hit on bert-tiny is not held up
    assert not cache.infer("bert-tiny", INPUTS["bert-tiny"][1]).cold
    gate.set()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 4 and all(r.cold for r in results)
    assert calls.count("resnet10") == 1
    for r in results:
        check(r, refs)
    s = cache.stats()
    assert (s.cold_loads, s.misses, s.hits) == (2, 5, 1)
    cache.close()


def test_inflight_request_finishes_on_the_session_it_started_on(store, refs):
    gate, started = threading.Event(), threading.Event()
    wrapped = {}

    def loader(manifest, device, backend, source_bytes):
        sess = variants.open_session(store, manifest.name, threads=1, verify=False)
        if manifest.name == "resnet10":
            sess = wrapped.setdefault("resnet10", _Gate(sess, gate, started))
        return sess

    audit = []
    cache = make(store, loader=loader, audit=lambda u, b: audit.append((u, b)))
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    gate.set()
    cache.infer("resnet10", INPUTS["resnet10"][0])  # loads the gated session
    gate.clear()
    started.clear()
    out = []
    slow = threading.Thread(target=lambda: out.append(cache.infer("resnet10",
                                                                  INPUTS["resnet10"][1])))
    slow.start()
    assert started.wait(30)
    # Drop the budget while the request runs: break-before-make, the old session drains.
    dropper = threading.Thread(target=cache.set_budget, args=(400,))
    dropper.start()
    assert wait_until(lambda: cache.resident().get("resnet10") != "resnet10")
    # the old session is still charged while it runs (the others are released meanwhile)
    assert wait_until(lambda: cache.resident_bytes() == 400)
    assert not wrapped["resnet10"].closed
    gate.set()
    slow.join(30)
    dropper.join(30)
    assert out[0].variant == "resnet10"  # finished on the session it started on
    check(out[0], refs, 1)
    assert wrapped["resnet10"].closed and not wrapped["resnet10"].ran_after_close
    assert cache.budget == 400 and cache.resident_bytes() <= 400
    assert all(used <= budget for used, budget in audit)
    res = cache.infer("resnet10", INPUTS["resnet10"][0])
    assert res.variant in {"resnet10+fp16", "resnet10+int8"}
    check(res, refs)
    assert cache.stats().failures == 0
    cache.close()


def test_stress_budget_changes_under_load(store, refs):
    """8 clients, thousands of requests, 100 budget changes: no failures, never over
    budget, every output computed by a resident variant of the right model."""
    floors = {"resnet10": 0.9, "bert-tiny": 0.85, "resnet10b": 0.9}
    lock = threading.Lock()
    samples, over = [0], []

    def audit(used, budget):
        samples[0] += 1
        if used > budget:
            over.append((used, budget))

    cache = make(store, budget=EVERYTHING, floors=floors, hysteresis=0.0, audit=audit,
                 clock=time.monotonic, ewma_halflife_s=0.5)
    rng = random.Random(7)
    budgets = [rng.randint(SMALLEST_SET, 1100) for _ in range(100)]
    done = threading.Event()
    records, errors = [], []
    models = list(CANDS)

    def client(seed):
        r = random.Random(seed)
        mine = []
        try:
            n = 0
            while n < 300 or not done.is_set():
                m = models[r.randrange(3)] if r.random() < 0.7 else models[seed % 3]
                k = r.randrange(2)
                res = cache.infer(m, INPUTS[m][k])
                mine.append((m, k, res))
                n += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            done.set()
        with lock:
            records.extend(mine)

    def budgeter():
        try:
            for b in budgets:
                cache.set_budget(b)
                assert cache.resident_bytes() <= b
                if rng.random() < 0.3:
                    cache.rebalance()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=budgeter))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert not over, over[:5]
    s = cache.stats()
    assert s.failures == 0 and s.requests == len(records) >= 8 * 300
    assert s.hits + s.misses + s.stalls == s.requests
    assert s.downgrades > 0 and s.upgrades > 0
    assert samples[0] > s.requests  # sampled at every request and every change
    by_model = {m: {c.variant: c for c in cs} for m, cs in CANDS.items()}
    for m, k, res in records:
        cand = by_model[m].get(res.variant)
        assert cand is not None, (m, res.variant)
        assert cand.accuracy >= floors[m]
        np.testing.assert_allclose(res.output, refs[res.variant, k], rtol=1e-5, atol=1e-6)
    cache.close()
    assert cache.resident_bytes() == 0


def test_background_thread_follows_the_budget_source(store):
    level = {"bytes": EVERYTHING}
    seen = threading.Event()

    def audit(used, budget):
        if budget == 400 and used <= 400:
            seen.set()

    cache = make(store, budget=lambda: level["bytes"], budget_poll_s=0.01, audit=audit)
    with cache:
        cache.infer("resnet10", INPUTS["resnet10"][0])
        cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
        level["bytes"] = 400
        assert seen.wait(30)
        assert cache.resident_bytes() <= 400
    assert cache.resident_bytes() == 0


# --- construction ------------------------------------------------------------------------------

def test_construction_errors(store):
    with pytest.raises(AdaptiveError, match="belongs to model 'bert-tiny'"):
        make(store, candidates={"resnet10": [Candidate("bert-tiny", 1, 1.0)]})
    with pytest.raises(AdaptiveError, match="not in the store"):
        make(store, candidates={"resnet10": [Candidate("resnet10+prune0.5", 1, 1.0)]})
    with pytest.raises(AdaptiveError, match="unknown models"):
        make(store, floors={"resnet99": 0.5})
    with pytest.raises(AdaptiveError, match="objective"):
        make(store, objective="speed")
    with pytest.raises(BudgetError):
        make(store, budget="lots")


def test_candidates_from_profiles_and_catalog(store, monkeypatch):
    def profiles(st, device, backend, max_batch):
        assert (device, backend, max_batch) == ("cpu", "onnxruntime", 4)
        return {"bert-tiny": [Candidate("bert-tiny+int8", 10, 0.9)]}

    cache = VariantCache(store, budget=100, profiles=profiles, max_batch=4, verify=False)
    assert cache.models == ("bert-tiny",)
    cache.close()

    # the default source: the store's catalog, which this store does not have
    with pytest.raises(AdaptiveError, match="memadapt profile .*--device cpu"):
        VariantCache(store, budget=100)
    monkeypatch.setitem(sys.modules, "adaptive.catalog", None)
    with pytest.raises(AdaptiveError, match="memadapt profile .*--device cpu"):
        VariantCache(store, budget=100)
    fake = types.ModuleType("adaptive.catalog")
    fake.candidates_from_catalog = lambda st, **kw: {"resnet10": []}
    monkeypatch.setitem(sys.modules, "adaptive.catalog", fake)
    with pytest.raises(AdaptiveError, match="no profiles .*memadapt profile"):
        catalog_candidates(store, "cpu", "onnxruntime", 8)


# --- budget sources --------------------------------------------------------------------------

def test_fixed_callable_and_as_budget():
    assert as_budget(5)() == 5 and as_budget("1KiB")() == 1024 and as_budget(2.0)() == 2
    assert isinstance(as_budget("cgroup"), CgroupBudget)
    assert isinstance(as_budget("cuda-free"), CudaFreeBudget)
    src = FixedBudget("1MB")
    assert as_budget(src) is src and src() == 10**6 and not src.dynamic
    assert CallableBudget(lambda: "2KB")() == 2000 and as_budget(lambda: 7)() == 7
    assert {"callable", "cgroup", "cuda-free", "fixed"} <= set(list_budget_sources())
    for bad in (-1, "many", True, 1.5, object()):
        with pytest.raises(BudgetError):
            as_budget(bad)()
    with pytest.raises(BudgetError, match=">= 0"):
        CallableBudget(lambda: -5)()
    assert issubclass(BudgetError, AdaptiveError) and isinstance(src, BudgetSource)


def test_cuda_free_budget_counts_own_bytes():
    src = CudaFreeBudget("cuda:1", reserve_bytes=100, fraction=0.5,
                         mem_info=lambda i: (1000 * (i + 1), 10_000))
    assert src() == int(2000 * 0.5) - 100
    src.attach(lambda: 400)
    assert src() == int(2400 * 0.5) - 100
    with pytest.raises(BudgetError, match="bad device"):
        CudaFreeBudget("cpu")


def test_cuda_free_budget_without_cuda_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(BudgetError, match="no CUDA device 0 is visible"):
        CudaFreeBudget()()


def test_cgroup_budget_v2_v1_and_unlimited(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("400000\n")
    src = CgroupBudget(reserve_bytes=0, fraction=1.0, path=v2)
    assert src() == 600_000
    src.attach(lambda: 100_000)  # the cache's own bytes count as available to it
    assert src() == 700_000
    (v2 / "memory.max").write_text("max\n")
    with pytest.raises(BudgetError, match="no cgroup memory limit"):
        src()

    # v1, discovered from /proc/self/cgroup; the limit sits on the parent cgroup
    root = tmp_path / "sys"
    leaf = root / "memory" / "pod" / "me"
    leaf.mkdir(parents=True)
    (leaf / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    (leaf / "memory.usage_in_bytes").write_text("100")
    (leaf.parent / "memory.limit_in_bytes").write_text("5000")
    (leaf.parent / "memory.usage_in_bytes").write_text("3000")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/pod/me\n1:cpu:/\n0::/\n")
    auto = CgroupBudget(reserve_bytes=500, fraction=0.5, root=root, proc_cgroup=proc)
    assert auto.free_bytes() == 2000 and auto() == 500
