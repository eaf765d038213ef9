"""The cache's parts on their own (ledger, host tier, config) and the behaviours the split
buys: any registered policy on real sessions, ordered budgets, deadlines on every wait, and a
miss that does not queue behind another model's load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive import Candidate, VariantCache
from adaptive.cache_config import CacheConfig
from adaptive.errors import AdaptiveError, CacheTimeout
from adaptive.hosttier import HostTier
from adaptive.ledger import ByteLedger, LedgerError
from tests.test_cache import (  # noqa: F401,F811 - fixtures
    CANDS,
    EVERYTHING,
    INPUTS,
    FakeClock,
    check,
    make,
    refs,
    store,
    wait_until,
)

# --- the ledger ------------------------------------------------------------------------------

GROUPS = {"g1": 50, "g2": 30}
OPS = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 200),
              st.frozensets(st.sampled_from(sorted(GROUPS)), max_size=2)),
    st.tuples(st.just("resize"), st.integers(0, 20), st.integers(0, 250)),
    st.tuples(st.just("retire"), st.integers(0, 20)),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("limit"), st.integers(0, 400)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_ledger_never_charges_over_its_limit(ops):
    led = ByteLedger(300, GROUPS)
    holds = []
    for op in ops:
        kind = op[0]
        before = led.charged
        if kind == "reserve":
            h = led.reserve(op[1], op[2])
            if h is None:
                assert led.charged == before and before + led.cost(op[1], op[2]) > led.limit
            else:
                holds.append(h)
                assert led.charged <= led.limit
        elif kind == "limit":
            led.limit = op[1]  # lowering it charges nothing; only shrinks are allowed after
        elif holds:
            h = holds[op[1] % len(holds)]
            if kind == "resize":
                grew = op[2] > h.private
                ok = led.resize(h, op[2])
                if grew and ok:
                    assert led.charged <= led.limit
                assert ok or grew
            elif kind == "retire":
                led.retire(h)
            else:
                led.release(h)
                holds.remove(h)
        led.audit(holds)
        live_private = sum(h.private for h in holds if not h.live)
        assert led.freeable() >= live_private
    for h in list(holds):
        led.release(h)
    assert led.charged == 0 and led.held_groups() == 0


def test_ledger_charges_a_group_once_and_refuses_double_release():
    led = ByteLedger(200, {"backbone": 100})
    a = led.reserve(30, {"backbone"})
    b = led.reserve(20, {"backbone"})
    assert led.charged == 150 and led.cost(10, {"backbone"}) == 10
    assert led.frees(a) == 30 and led.holds("backbone") == 2
    led.release(a)
    assert led.charged == 120
    with pytest.raises(LedgerError):
        led.release(a)
    led.release(b)
    assert led.charged == 0


# --- the host tier --------------------------------------------------------------------------


def test_host_tier_is_an_lru_mapping_bounded_by_bytes():
    dropped = []
    tier = HostTier(10, on_evict=lambda k, v: dropped.append(k))
    tier["a"] = b"1234"
    tier["b"] = b"5678"
    assert tier.currsize == 8 and tier["a"] == b"1234"  # a is now the most recent
    tier["c"] = b"999"  # 11 > 10: b (least recently used) goes
    assert list(tier) == ["a", "c"] and dropped == ["b"] and tier.currsize == 7
    tier["huge"] = b"x" * 11  # larger than maxsize: not kept
    assert "huge" not in tier and tier.maxsize == 10 and tier.getsizeof(b"abc") == 3
    tier.clear()
    assert len(tier) == 0 and tier.currsize == 0 and sorted(dropped) == ["a", "b", "c"]


# --- configuration ---------------------------------------------------------------------------


def test_config_is_frozen_validated_and_shorthand(store):
    cfg = CacheConfig(budget=EVERYTHING, policy="lru", max_batch=2)
    with pytest.raises(AttributeError):
        cfg.policy = "infaas"  # type: ignore[misc]
    for bad, match in (({"policy": "nope"}, "unknown policy 'nope'; known: .*infaas"),
                       ({"policy": "belady"}, "offline"),
                       ({"wait_timeout_s": 0}, "wait_timeout_s"),
                       ({"swap_workers": -1}, "swap_workers"),
                       ({"slos": {"resnet10": -1}}, "slos"),
                       ({"device": "tpu"}, "unknown device")):
        with pytest.raises(AdaptiveError, match=match):
            CacheConfig(**bad)
    with pytest.raises(AdaptiveError, match="unknown cache settings .*'budgett'"):
        VariantCache(store, budgett=5)
    with pytest.raises(AdaptiveError, match="slos name unknown models"):
        make(store, slos={"nope": 0.1})
    cache = make(store, config=cfg)
    assert cache.policy == "lru" and cache.config.budget == EVERYTHING and cache.max_batch == 2
    cache.close()
    assert cfg.with_(policy="infaas").policy == "infaas"


def test_nested_list_inputs_are_checked_against_max_batch(store):
    cache = make(store, max_batch=1)
    batch2 = INPUTS["resnet10"][0].repeat(2, axis=0).tolist()
    with pytest.raises(AdaptiveError, match="batch of 2 .* exceeds max_batch=1"):
        cache.infer("resnet10", [batch2])
    cache.close()


# --- every registered online policy on real sessions ----------------------------------------

@pytest.mark.parametrize("policy", ["memadapt", "infaas", "lru", "cremebrulee", "lfu"])
def test_any_policy_serves_within_the_budget(store, refs, policy):
    audit = []
    cache = make(store, policy=policy, budget=EVERYTHING, audit=lambda u, b: audit.append((u, b)))
    order = ["resnet10", "bert-tiny", "resnet10b", "resnet10", "bert-tiny"]
    for k, m in enumerate(order * 2):
        res = cache.infer(m, INPUTS[m][k % 2])
        check(res, refs, k % 2)
    for budget in (450, 250, EVERYTHING):  # down, further down, back up
        cache.set_budget(budget)
        assert cache.resident_bytes() <= budget and cache.budget == budget
        for k, m in enumerate(order):
            res = cache.infer(m, INPUTS[m][k % 2])
            check(res, refs, k % 2)
            assert res.variant in {c.variant for c in CANDS[m]}
    s = cache.stats()
    assert s.failures == 0 and s.policy == policy
    assert s.hits + s.misses + s.stalls == s.requests == len(order) * 5
    assert all(used <= budget for used, budget in audit)
    cache.close()
    assert cache.resident_bytes() == 0


# --- budgets in order, waits with deadlines ---------------------------------------------------


def test_a_fixed_budget_set_during_a_refresh_is_not_overwritten(store):
    reading, release = threading.Event(), threading.Event()

    def slow_source():
        if reading.is_set():  # the second read (a refresh) blocks until released
            release.wait(30)
        reading.set()
        return EVERYTHING

    cache = make(store, budget=slow_source)
    refresher = threading.Thread(target=cache.refresh_budget)
    refresher.start()
    assert wait_until(lambda: reading.is_set())
    time.sleep(0.05)  # the refresh is inside the old source now
    setter = threading.Thread(target=cache.set_budget, args=(700,))
    setter.start()
    time.sleep(0.05)
    release.set()
    refresher.join(30)
    setter.join(30)
    assert cache.budget == 700  # the newer value won
    assert not cache.refresh_budget() and cache.budget == 700  # and a fixed budget stays
    cache.close()


class _Hang:
    """A session whose ``run`` blocks until ``gate`` is set."""

    def __init__(self, sess, gate, started):
        self._s, self._gate, self._started = sess, gate, started
        self.input_names = sess.input_names

    def run(self, x):
        self._started.set()
        self._gate.wait(60)
        return self._s.run(x)

    def close(self):
        self._s.close()


def test_a_hung_request_makes_set_budget_fail_after_its_deadline(store):
    import variants

    gate, started = threading.Event(), threading.Event()

    def loader(manifest, device, backend, source):
        sess = variants.open_session(store, manifest.name, threads=1, verify=False)
        return _Hang(sess, gate, started) if manifest.name == "resnet10" else sess

    cache = make(store, loader=loader, wait_timeout_s=0.5,
                 candidates={"resnet10": [CANDS["resnet10"][0]], "bert-tiny": CANDS["bert-tiny"]})
    hung = threading.Thread(target=cache.infer, args=("resnet10", INPUTS["resnet10"][0]))
    hung.start()
    assert started.wait(30)
    t0 = time.monotonic()
    with pytest.raises(CacheTimeout, match=r"resnet10 .*1 running"):
        cache.set_budget(150)  # resnet10 must leave; its request hangs
    assert time.monotonic() - t0 < 10
    assert cache.resident() == {} or "resnet10" not in cache.resident()
    gate.set()
    hung.join(30)
    assert wait_until(lambda: cache.resident_bytes() <= 150)
    cache.close()


def _stuck_loader(store, variant, gate, started):
    """A loader whose loads of ``variant`` set ``started`` and wait for ``gate``."""
    import variants

    def loader(manifest, device, backend, source):
        if manifest.name == variant:
            started.set()
            gate.wait(60)
        return variants.open_session(store, manifest.name, threads=1, verify=False)

    return loader


def test_a_miss_does_not_wait_for_another_models_load(store, refs):
    gate, started = threading.Event(), threading.Event()
    loader = _stuck_loader(store, "resnet10", gate, started)

    cache = make(store, loader=loader, policy="lru")
    slow = threading.Thread(target=cache.infer, args=("resnet10", INPUTS["resnet10"][0]))
    slow.start()
    assert started.wait(30)  # resnet10's load is under way and stuck
    t0 = time.monotonic()
    res = cache.infer("bert-tiny", INPUTS["bert-tiny"][0])  # loads beside it, at once
    check(res, refs)
    assert time.monotonic() - t0 < 20 and slow.is_alive()
    gate.set()
    slow.join(30)
    assert set(cache.resident()) == {"resnet10", "bert-tiny"}
    cache.close()


def test_memadapt_upgrades_beside_the_serving_variant_on_a_worker(store, refs):
    """A miss loads the variant fastest to load; the better one loads beside it on a swap
    worker, and requests keep hitting the small one until it is in."""
    gate, started = threading.Event(), threading.Event()
    loader = _stuck_loader(store, "resnet10", gate, started)

    cands = {"resnet10": [Candidate("resnet10", 400, 0.95, 0.001, 0.5),
                          Candidate("resnet10+int8", 120, 0.90, 0.001, 0.05)]}
    clock = FakeClock()
    cache = make(store, loader=loader, candidates=cands, policy="memadapt", clock=clock)
    first = cache.infer("resnet10", INPUTS["resnet10"][0])
    assert first.variant == "resnet10+int8" and first.cold
    assert started.wait(30)  # the upgrade runs on the worker, stuck in its load
    again = cache.infer("resnet10", INPUTS["resnet10"][1])
    assert again.variant == "resnet10+int8" and not again.cold
    assert cache.resident_bytes() == 520  # both charged while the new one loads
    gate.set()
    assert wait_until(lambda: cache.resident() == {"resnet10": "resnet10"})
    assert wait_until(lambda: cache.resident_bytes() == 400)
    check(cache.infer("resnet10", INPUTS["resnet10"][0]), refs)
    assert cache.stats().upgrades == 1
    cache.close()


@pytest.mark.parametrize("abandoned", [False, True])
def test_on_a_trace_clock_a_side_load_installs_when_the_mirror_completes_it(store, refs,
                                                                            abandoned):
    """A replay's loads take no trace time: the upgrade memadapt starts beside a fresh load is
    in at once for real, but serves only from its estimated end (0.5 s later on the clock), as
    in the simulator; abandoned before then (a miss needs its room) it is only released, no
    downgrade back to a variant the simulator never left."""
    cands = {"resnet10": [Candidate("resnet10", 400, 0.95, 0.001, 0.5),
                          Candidate("resnet10+int8", 120, 0.90, 0.001, 0.05)],
             "bert-tiny": [Candidate("bert-tiny", 300, 0.92, 0.001, 0.05)]}
    clock = FakeClock()
    cache = make(store, candidates=cands, budget=600, policy="memadapt", clock=clock,
                 policy_options={"reserve_unseen": False}, swap_workers=0, trace_clock=True)
    assert cache.infer("resnet10", INPUTS["resnet10"][0]).variant == "resnet10+int8"
    assert cache.resident_bytes() == 520  # the upgrade is loaded, charged beside it
    clock.t = 0.1
    if abandoned:
        assert cache.infer("bert-tiny", INPUTS["bert-tiny"][0]).cold
        assert cache.resident_bytes() == 420
    res = cache.infer("resnet10", INPUTS["resnet10"][0])
    assert res.variant == "resnet10+int8" and not res.cold
    clock.t = 1.0
    res = cache.infer("resnet10", INPUTS["resnet10"][1])
    check(res, refs, 1)
    assert res.variant == ("resnet10+int8" if abandoned else "resnet10") and not res.cold
    stats = cache.stats()
    assert (stats.upgrades, stats.downgrades) == ((0, 0) if abandoned else (1, 0))
    assert cache.resident_bytes() == (420 if abandoned else 400)
    cache.close()
    assert cache.resident_bytes() == 0


def test_load_peak_is_charged_while_loading(store):
    audit = []
    cands = {"resnet10": [Candidate("resnet10", 400, 0.95, load_peak_bytes=600)],
             "bert-tiny": [Candidate("bert-tiny", 300, 0.92)]}
    cache = make(store, candidates=cands, budget=1000, policy="lru",
                 audit=lambda u, b: audit.append(u))
    assert cache.plan_budget == 800  # 200 kept back for one load's peak
    cache.infer("resnet10", INPUTS["resnet10"][0])
    assert max(audit) == 600 and cache.resident_bytes() == 400
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    assert cache.resident_bytes() == 700 and max(audit) <= 1000
    cache.close()
    np.testing.assert_equal(cache.resident_bytes(), 0)


@pytest.mark.parametrize("policy", ["memadapt", "memadapt-v1"])
def test_evict_frees_one_model_and_the_next_request_loads_it(store, refs, policy):
    cache = make(store, policy=policy)
    cache.infer("resnet10", INPUTS["resnet10"][0])
    cache.infer("bert-tiny", INPUTS["bert-tiny"][0])
    assert cache.evict("resnet10") and not cache.evict("resnet10")
    assert set(cache.resident()) == {"bert-tiny"}
    assert cache.resident_bytes() == sum(
        c.memory_bytes for c in CANDS["bert-tiny"] if c.variant == cache.resident()["bert-tiny"])
    res = cache.infer("resnet10", INPUTS["resnet10"][1])
    assert res.cold
    check(res, refs, 1)
    cache.close()
