"""The trace simulator and the caching policies, on small made-up profiles.

Contract tests are parametrized over ``list_policies()`` so a newly registered policy is held
to the budget and floor invariants the moment it exists.
"""

from __future__ import annotations

import numpy as np
import pytest

from adaptive.errors import AdaptiveError
from adaptive.policies import (
    CacheInvariantError,
    Policy,
    PolicyError,
    get_policy,
    list_policies,
    register_policy,
)
from adaptive.select import Candidate, ModelDemand
from adaptive.simulate import SimResult, clone_population, compare, simulate
from adaptive.traces import BudgetTrace, RequestTrace, TraceError, synth

MB = 1_000_000


def _families() -> list[ModelDemand]:
    """Three families with base, quantized, pruned and early-exit variants and a floor that
    rules out the smallest, least accurate one (so floor violations are possible)."""
    return [
        ModelDemand("cnn", [
            Candidate("base", 200 * MB, 0.76, 0.040, 0.17),
            Candidate("int8", 100 * MB, 0.75, 0.020, 0.09),
            Candidate("prune0.5+int8", 60 * MB, 0.71, 0.010, 0.06),
            Candidate("exit2", 40 * MB, 0.55, 0.008, 0.03),
        ], floor=0.70),
        ModelDemand("small", [
            Candidate("base", 100 * MB, 0.70, 0.018, 0.07),
            Candidate("int8", 50 * MB, 0.69, 0.010, 0.04),
            Candidate("exit2", 30 * MB, 0.50, 0.007, 0.02),
        ], floor=0.65),
        ModelDemand("bert", [
            Candidate("base", 180 * MB, 0.85, 0.012, 0.25),
            Candidate("int8", 70 * MB, 0.845, 0.006, 0.12),
            Candidate("exit3", 120 * MB, 0.79, 0.006, 0.17),
        ], floor=0.80),
    ]


@pytest.fixture(scope="module")
def population() -> tuple[ModelDemand, ...]:
    return clone_population(_families(), 24, seed=0)


def _base_total(demands) -> int:
    return sum(max(d.eligible(), key=lambda c: c.accuracy).memory_bytes for d in demands)


@pytest.fixture(scope="module")
def budget_trace(population) -> BudgetTrace:
    total = _base_total(population)
    fr = [0.6, 0.15, 0.4, 0.05, 1.0, 0.25]
    return BudgetTrace(np.arange(len(fr)) * 100.0, np.array([int(f * total) for f in fr]))


def _check_invariants(r: SimResult, budget: int | BudgetTrace) -> None:
    assert r.floor_violations == 0
    assert r.hits + r.misses + r.stalls + r.rejected == r.requests
    assert 0 <= r.effective_accuracy <= r.slo_attainment <= 1
    assert 0 <= r.normalized_accuracy <= 1
    # where effective accuracy goes adds up, and nothing is lost twice
    assert r.accuracy_lost_late >= 0 and r.accuracy_lost_rungs >= -1e-12
    assert r.best_accuracy - r.accuracy_lost_late - r.accuracy_lost_rungs == pytest.approx(
        r.effective_accuracy, abs=1e-9)
    for _t, used, b in r.memory_series:
        assert 0 <= used <= b
    limit = budget if isinstance(budget, int) else int(budget.budget_bytes.max())
    assert r.peak_bytes <= limit


# --- contract over every registered policy ---------------------------------------------------


@pytest.mark.parametrize("policy", list_policies())
@pytest.mark.parametrize("kind", ["zipf", "azure", "bursty"])
def test_every_policy_respects_budget_and_floor(policy, kind, population):
    tr = synth(kind, [d.model for d in population], 4000, seed=5, duration_s=600)
    for frac in (0.08, 0.3, 1.0):
        budget = int(frac * _base_total(population))
        r = simulate(tr, population, policy, budget, seed=1)
        _check_invariants(r, budget)
        assert r.rejected == 0  # every model has an eligible variant under 8% of the total
        assert r.mean_accuracy >= min(d.floor for d in population)


@pytest.mark.parametrize("policy", list_policies())
def test_every_policy_follows_a_changing_budget(policy, population, budget_trace):
    tr = synth("zipf", [d.model for d in population], 4000, seed=2, duration_s=600)
    r = simulate(tr, population, policy, budget_trace, seed=0)
    _check_invariants(r, budget_trace)
    # the series holds a point at every budget change, taken right after the policy shed
    at_change = {t: (used, b) for t, used, b in r.memory_series if t in (100.0, 300.0)}
    assert at_change[100.0][0] <= budget_trace.budget_bytes[1]
    assert at_change[300.0][0] <= budget_trace.budget_bytes[3]


@pytest.mark.parametrize("policy", list_policies())
def test_every_policy_is_deterministic_for_a_seed(policy, population):
    tr = synth("bursty", [d.model for d in population], 3000, seed=9, duration_s=600)
    budget = int(0.2 * _base_total(population))
    assert simulate(tr, population, policy, budget, seed=4) == \
        simulate(tr, population, get_policy(policy), budget, seed=4)


def test_cache_rejects_a_policy_that_overfills():
    @register_policy("_test_greedy")
    class Greedy(Policy):  # loads without making room: the cache must refuse
        def on_miss(self, i, t, m):
            self.cache.load(m, 0, t)
            return 0

        def on_budget(self, t, budget):
            pass

    tr = RequestTrace.from_names([0, 1], ["a", "b"])
    demands = [ModelDemand(x, [Candidate("base", 10, 0.9)]) for x in "ab"]
    try:
        with pytest.raises(CacheInvariantError, match="over the budget of 15"):
            simulate(tr, demands, "_test_greedy", 15)
        with pytest.raises(CacheInvariantError, match="after the budget dropped to 5"):
            simulate(RequestTrace.from_names([0, 2], ["a", "a"]), demands, "_test_greedy",
                     BudgetTrace(np.array([0.0, 1.0]), np.array([15, 5])))
    finally:
        from adaptive import policy_base

        policy_base._POLICIES.unregister("_test_greedy")


# --- exact behaviour on tiny traces ----------------------------------------------------------


def _tiny(load_s=1.0, lat=0.1):
    return [ModelDemand(x, [Candidate("base", 100, 0.9, lat, load_s)]) for x in "ABC"]


def test_lru_hand_computed_sequence():
    seq = "ABACBAAC"
    ts = [10.0 * k for k in range(len(seq))]
    demands = _tiny()
    # room for two: A- B- A+ C-(evicts B) B-(evicts A) A-(evicts C) A+ C-(evicts B)
    expected = "--+---+-"
    outcome = ""
    for k in range(1, len(seq) + 1):  # replay prefixes: the k-th outcome is the change in hits
        r = simulate(RequestTrace.from_names(ts[:k], list(seq[:k]), models=list("ABC")),
                     demands, "lru", 200)
        prev = outcome.count("+")
        outcome += "+" if r.hits > prev else "-"
    assert outcome == expected
    r = simulate(RequestTrace.from_names(ts, list(seq)), demands, "lru", 200)
    assert (r.hits, r.misses, r.loads, r.evictions) == (2, 6, 6, 4)
    assert r.miss_rate == pytest.approx(6 / 8)
    assert r.mean_latency_s == pytest.approx((6 * 1.1 + 2 * 0.1) / 8)
    assert r.load_delay_over_exec == pytest.approx(6.0 / 0.8)
    assert r.mean_accuracy == pytest.approx(0.9)


def test_request_during_a_load_waits_for_it_and_is_a_miss():
    tr = RequestTrace.from_names([0.0, 0.25, 5.0], ["A", "A", "A"], batch=[1, 2, 1])
    r = simulate(tr, _tiny(load_s=1.0, lat=0.1), "lru", 100)
    assert (r.hits, r.misses, r.stalls) == (1, 2, 0)  # a load a request waits for is a miss
    # 1.1 (cold) + 0.75 wait + 0.2 exec (batch 2) + 0.1
    assert r.mean_latency_s == pytest.approx((1.1 + 0.95 + 0.1) / 3)
    assert r.load_delay_over_exec == pytest.approx(1.75 / 0.4)
    # no SLO: only the request that did not wait is on time
    assert r.slo_attainment == pytest.approx(1 / 3)
    assert r.effective_accuracy == pytest.approx(0.9 / 3)
    # the two late requests lose their accuracy; the one variant is the best, so no rung loss
    assert (r.best_accuracy, r.accuracy_lost_late, r.accuracy_lost_rungs) == pytest.approx(
        (0.9, 0.9 * 2 / 3, 0.0))


def test_slo_metrics_count_requests_within_their_deadline():
    tr = RequestTrace.from_names([0.0, 0.25, 5.0], ["A", "A", "A"], batch=[1, 2, 1])
    demands = [ModelDemand("A", [Candidate("base", 100, 0.9, 0.1, 1.0)], slo_s=1.15)]
    r = simulate(tr, demands, "lru", 100)
    # latencies 1.1, 0.95, 0.1: all within 1.15 s
    assert r.slo_attainment == 1.0 and r.effective_accuracy == pytest.approx(0.9)
    assert r.goodput == pytest.approx(3 / 5.0)
    assert r.bytes_loaded == 100


def test_slo_makes_slow_variants_ineligible_unless_none_is_fast_enough():
    fast = Candidate("int8", 40, 0.85, 0.05, 0.2)
    slow = Candidate("base", 100, 0.9, 0.4, 1.0)
    d = ModelDemand("m", [slow, fast], floor=0.8, slo_s=0.3)
    assert d.eligible() == (fast,)
    assert ModelDemand("m", [slow], floor=0.8, slo_s=0.3).eligible() == (slow,)
    for policy in ("lru", "memadapt", "infaas"):
        r = simulate(RequestTrace.from_names([0, 10], ["m", "m"]), [d], policy, 1000)
        assert r.mean_accuracy == pytest.approx(0.85), policy
    with pytest.raises(ValueError, match="slo_s"):
        ModelDemand("m", [fast], slo_s=0)


def test_infeasible_requests_are_rejected_not_served():
    demands = [
        ModelDemand("big", [Candidate("base", 500, 0.9), Candidate("tiny", 10, 0.3)], floor=0.5),
        ModelDemand("none", [Candidate("base", 10, 0.4)], floor=0.5),  # nothing meets the floor
        ModelDemand("ok", [Candidate("base", 50, 0.9)]),
    ]
    tr = RequestTrace.from_names([0, 1, 2, 3], ["big", "none", "ok", "ok"])
    for policy in list_policies():
        r = simulate(tr, demands, policy, 100)
        assert (r.rejected, r.misses, r.hits) == (2, 1, 1), policy
        assert r.floor_violations == 0
        assert r.miss_rate == pytest.approx(0.5)


def test_whole_model_policies_fall_back_to_a_variant_that_fits():
    demands = [ModelDemand("m", [Candidate("base", 200, 0.9), Candidate("int8", 80, 0.85)],
                           floor=0.8)]
    r = simulate(RequestTrace.from_names([0], ["m"]), demands, "lru", 100)
    assert (r.misses, r.rejected) == (1, 0)
    assert r.mean_accuracy == pytest.approx(0.85)


def _two_variants(models: str, base: int = 100, small: int = 40, small_acc: float = 0.88):
    return [ModelDemand(x, [Candidate("base", base, 0.9, 0.01, 1.0),
                            Candidate("int8", small, small_acc, 0.01, 0.5)]) for x in models]


def test_memadapt_loads_fast_upgrades_without_waits_and_downgrades_on_a_budget_drop():
    demands = _two_variants("AB")
    tr = RequestTrace.from_names([0, 1, 15, 25, 35, 45, 120, 121], list("ABABABAB"))
    budget = BudgetTrace(np.array([0.0, 100.0]), np.array([300, 100]))
    mem = simulate(tr, demands, "memadapt", budget)
    lru = simulate(tr, demands, "lru", budget)
    # misses load int8 (fastest) and, with memory to spare, start loading the base beside it
    # (make-before-break: no request waits); the drop at t=100 steps both down instead of
    # evicting one
    assert (mem.misses, mem.stalls, mem.evictions, mem.swaps) == (2, 0, 0, 4)
    assert mem.policy_stats["upgrades"] == 2 and mem.policy_stats["urgent_downgrades"] == 2
    assert mem.mean_accuracy == pytest.approx((0.88 * 4 + 0.9 * 4) / 8)
    # the two misses are late; the two requests after the drop are served int8 on time
    assert (mem.accuracy_lost_late, mem.accuracy_lost_rungs) == pytest.approx(
        (0.9 * 2 / 8, 0.02 * 2 / 8))
    assert (lru.misses, lru.evictions) == (4, 3)
    assert (100.0, 80, 100) in mem.memory_series
    # both variants are charged while an upgrade loads: A's base + B's int8 and base
    assert mem.peak_bytes == 240


def test_memadapt_steps_a_hot_model_down_rather_than_evict_one_asked_for_at_once():
    # two models asked for 10 times a second each; the budget drops 50 bytes below their
    # bases. Evicting one frees 100 but buys nothing over the 50 wanted, and it is back
    # within 0.1 s: a miss and a reload's worth of misses, against the same reload's stalls
    # for stepping one down, so memadapt steps one down (the server test's 200MB drop)
    demands = _two_variants("AB")
    ts = np.arange(0.0, 60.0, 0.05)
    names = ["AB"[k % 2] for k in range(len(ts))]
    budget = BudgetTrace(np.array([0.0, 30.0]), np.array([300, 150]))
    r = simulate(RequestTrace.from_names(list(ts), names), demands, "memadapt", budget)
    assert (r.evictions, r.policy_stats["urgent_downgrades"]) == (0, 1)
    early = int((ts < 30).sum())
    before = simulate(RequestTrace.from_names(list(ts[:early]), names[:early]), demands,
                      "memadapt", 300)
    assert r.misses == before.misses  # nothing missed after the drop
    assert r.stalls == 5  # A's requests during its 0.5 s step down


def test_memadapt_takes_room_from_upgrades_before_it_evicts():
    demands = _two_variants("ABCDE", small=50, small_acc=0.85)
    tr = RequestTrace.from_names([0, 1, 15, 30, 40, 50], list("ABACDE"))
    # without room kept for models not seen yet, A is upgraded at t=15; C fits; D is
    # admitted by stepping A down (break-before-make); only E, with every resident at its
    # smallest, needs an eviction
    r = simulate(tr, demands, get_policy("memadapt", reserve_unseen=False), 200)
    assert (r.misses, r.hits, r.evictions) == (5, 1, 1)
    assert r.policy_stats["upgrades"] == 1 and r.policy_stats["urgent_downgrades"] == 1
    # by default room is kept for the three models not seen yet: nothing to step down
    r = simulate(tr, demands, "memadapt", 200)
    assert (r.misses, r.hits, r.stalls, r.policy_stats["upgrades"]) == (5, 1, 0, 0)


def test_make_before_break_never_overfills_and_break_before_make_stalls():
    from adaptive.cachestate import CacheState

    d = _two_variants("A")
    c2 = CacheState(d, 140)
    c2.load(0, 1, 0.0)
    c2.swap(0, 0, 1.0, "mbb")  # 40 + 100 charged until t=2
    assert (c2.used, c2.res[0], c2.pend[0]) == (140, 1, 0)
    c2.settle(1.5)
    assert c2.res[0] == 1
    c2.settle(2.0)
    assert (c2.used, c2.res[0], c2.pend[0], c2.stalling[0]) == (100, 0, -1, False)
    c2.swap(0, 1, 3.0, "bbm")  # base released at once, int8 loads until 3.5: a stall
    assert (c2.used, c2.res[0], c2.ready_at[0], c2.stalling[0]) == (40, 1, 3.5, True)
    c3 = CacheState(d, 120)
    c3.load(0, 1, 0.0)
    with pytest.raises(CacheInvariantError, match="make-before-break .* over the budget"):
        c3.swap(0, 0, 1.0, "mbb")  # 40 + 100 > 120


def test_memadapt_upgrades_when_the_budget_returns(population):
    tr = synth("zipf", [d.model for d in population], 6000, seed=3, duration_s=900)
    total = _base_total(population)
    low = int(0.25 * total)
    rising = BudgetTrace(np.array([0.0, 300.0]), np.array([low, total]))
    flat = simulate(tr, population, "memadapt", low)
    up = simulate(tr, population, "memadapt", rising)
    assert up.policy_stats["upgrades"] > 0
    assert up.mean_accuracy > flat.mean_accuracy


def test_admission_decisions_name_each_model_once():
    """The shared decisions (adaptive.admission): a two-rung downgrade is one move, and the
    coldest resident is evicted only when downgrading everyone cannot make room."""
    from adaptive.admission import Ladders, Move, admit, shed

    lad = Ladders([
        ModelDemand("A", [Candidate("a3", 100, 0.9), Candidate("a2", 60, 0.8),
                          Candidate("a1", 20, 0.7)]),
        ModelDemand("B", [Candidate("b", 120, 0.9)]),
        ModelDemand("C", [Candidate("c", 30, 0.9)]),
    ])
    assert lad.ladder[0] == [2, 1, 0] and lad.min_mem == [20, 120, 30]
    moves, v = admit(lad, 1, [0, -1, -1], [0], 50, [0.0, 0.0, 0.0])
    assert (moves, v) == ([Move(0, 2)], 0)  # A straight to a1: 130 bytes free
    # C resident and colder than A: too little room even with A at a1, so C goes
    moves, v = admit(lad, 1, [0, -1, 0], [0, 2], 20, [1.0, 0.0, -1.0])
    assert (moves, v) == ([Move(2, -1), Move(0, 2)], 0)
    assert shed(lad, [0, -1, 0], [0, 2], -50, [1.0, 0.0, 2.0]) == [Move(0, 2)]
    assert shed(lad, [0, -1, 0], [0, 2], 10, [0.0, 0.0, 0.0]) == []


# --- policies compared ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_belady_never_misses_more_than_lru_on_equal_sizes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    demands = [ModelDemand(f"m{k}", [Candidate("base", 10, 0.9, 0.01, 0.1)]) for k in range(n)]
    kind = ["zipf", "bursty", "azure"][seed % 3]
    tr = synth(kind, n, 3000, seed=seed, duration_s=600)
    for slots in range(1, n + 1):
        b = simulate(tr, demands, "belady", 10 * slots)
        lru = simulate(tr, demands, "lru", 10 * slots)
        assert b.misses <= lru.misses
        assert b.misses <= simulate(tr, demands, "random", 10 * slots, seed=seed).misses


@pytest.mark.parametrize("kind", ["zipf", "azure"])
def test_memadapt_misses_less_than_lru_when_small_variants_exist(kind, population):
    tr = synth(kind, [d.model for d in population], 8000, seed=11, duration_s=1200)
    total = _base_total(population)
    for frac in (0.1, 0.2, 0.3, 0.5):
        res = compare(tr, population, ["lru", "memadapt"], int(frac * total))
        assert res["memadapt"].miss_rate <= res["lru"].miss_rate
        assert res["memadapt"].floor_violations == 0


# --- API edges --------------------------------------------------------------------------------


def test_unknown_policy_and_bad_options_list_what_is_known():
    with pytest.raises(PolicyError, match="unknown policy 'fifo'; known: .*belady"):
        get_policy("fifo")
    with pytest.raises(PolicyError, match="memadapt"):
        get_policy("memadapt", tau_s=0)
    with pytest.raises(PolicyError, match="policy 'lru': .*argument"):
        get_policy("lru", size=3)
    assert {"random", "lru", "lfu", "loadtime", "belady", "cremebrulee", "infaas",
            "memadapt"} <= set(list_policies())


def test_memadapt_options_are_a_frozen_validated_config():
    from dataclasses import FrozenInstanceError

    from adaptive.memadapt_policy import MemAdaptConfig

    cfg = MemAdaptConfig(price=2, probe=0.1)
    pol = get_policy("memadapt", config=cfg, tick_s=5)
    assert pol.config == MemAdaptConfig(price=2.0, probe=0.1, tick_s=5.0)
    assert cfg.tick_s == 10.0  # keywords override a copy, never the config given
    with pytest.raises(FrozenInstanceError):
        cfg.price = 1.0  # type: ignore[misc]
    with pytest.raises(PolicyError, match="unknown option.*pric; options are .*price"):
        get_policy("memadapt", pric=3)
    with pytest.raises(PolicyError, match="defer must be true or false, got 'yes'"):
        MemAdaptConfig(defer="yes")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="window_s must be > 0 seconds"):
        MemAdaptConfig(window_s=-1)


def test_unknown_model_in_trace_names_the_request():
    tr = RequestTrace.from_names([0, 1], ["A", "Q"])
    with pytest.raises(TraceError, match="request #1: unknown model 'Q'"):
        simulate(tr, _tiny(), "lru", 100)


def test_bad_budget_is_an_error():
    with pytest.raises(AdaptiveError, match="budget"):
        simulate(RequestTrace.from_names([0], ["A"]), _tiny(), "lru", -1)


def test_result_to_dict_is_json_ready():
    import json

    r = simulate(RequestTrace.from_names([0, 1], ["A", "A"]), _tiny(), "memadapt", 100)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["policy"] == "memadapt" and d["hits"] == 1
    assert d["memory_series"][-1] == [1.0, 100, 100]


def test_clone_population_names_and_jitter():
    fams = _families()
    pop = clone_population(fams, 7, seed=3)
    assert [d.model for d in pop] == ["cnn#00", "small#00", "bert#00", "cnn#01", "small#01",
                                      "bert#01", "cnn#02"]
    assert pop == clone_population(fams, 7, seed=3)
    a, b = pop[0], pop[3]
    assert [c.memory_bytes for c in a.candidates] == [c.memory_bytes for c in fams[0].candidates]
    assert a.floor == fams[0].floor
    ratio = a.candidates[0].load_s / fams[0].candidates[0].load_s
    assert 0.9 <= ratio <= 1.1
    assert a.candidates[1].latency_s / fams[0].candidates[1].latency_s == pytest.approx(ratio)
    assert a.candidates[0].load_s != b.candidates[0].load_s
    assert clone_population(fams, 150)[-1].model == "bert#49"


def test_a_miss_waits_for_a_make_before_break_downgrade_instead_of_making_anyone_stall():
    demands = _two_variants("AB") + [ModelDemand("C", [Candidate("c", 80, 0.9, 0.01, 1.0)])]
    tr = RequestTrace.from_names([0, 2, 3, 4, 5, 5.2, 6.0, 7.0], list("AAABCACC"))
    r = simulate(tr, demands, get_policy("memadapt", reserve_unseen=False, defer=True), 200)
    # A is upgraded beside its first load; C (colder than A) needs 80 with 60 free: A steps
    # down make-before-break (serving its base meanwhile) and C's load waits for that
    assert r.policy_stats["deferrals"] == 1 and r.stalls == 0 and r.evictions == 0
    assert (r.hits, r.misses) == (4, 4)  # A at 0, B at 4, and C at 5.0 and 6.0 (its load)
    # waits: A and B their int8 loads (0.5 s each); C at 5.0 A's int8 load (0.5 s) and then
    # its own (1.0 s); C at 6.0 the rest (0.5 s)
    assert r.load_delay_over_exec == pytest.approx((0.5 + 0.5 + 1.5 + 0.5) / (8 * 0.01))


class _Audited:
    """Wraps a policy and audits the cache's ledger after every call."""

    def __init__(self, inner: Policy):
        self.inner = inner
        self.name, self.offline = inner.name, inner.offline

    def reset(self, cache, **kw):
        self.cache = cache
        self.inner.reset(cache, **kw)

    def _audit(self, value=None):
        self.cache.audit()
        return value

    def on_hit(self, i, t, m):
        return self._audit(self.inner.on_hit(i, t, m))

    def on_miss(self, i, t, m):
        return self._audit(self.inner.on_miss(i, t, m))

    def on_budget(self, t, b):
        return self._audit(self.inner.on_budget(t, b))

    def stats(self):
        return self.inner.stats()


@pytest.mark.parametrize("policy", list_policies())
@pytest.mark.parametrize("seed", range(3))
def test_ledger_matches_the_residency_after_every_decision(policy, seed, population):
    rng = np.random.default_rng(seed)
    kind = ["zipf", "azure", "bursty"][seed]
    tr = synth(kind, [d.model for d in population], 2500, seed=seed, duration_s=400)
    total = _base_total(population)
    steps = rng.uniform(0.05, 1.1, size=6)
    budget = BudgetTrace(np.arange(6) * 60.0, (steps * total).astype(np.int64))
    for kw in ({}, {"reserve_unseen": False, "defer": True}) if policy == "memadapt" else ({},):
        r = simulate(tr, population, _Audited(get_policy(policy, **kw)), budget, seed=seed)
        _check_invariants(r, budget)


def _hot_and_cold(gain: float):
    """A hot model ``H`` whose upgrade costs 20 bytes; five warm models of 100 bytes, each
    asked for every 20 s, and three rare ones asked for in turn every 60 s. At 550 bytes the
    working set (810 at the smallest variants) never fits and the reserve for the rare ones
    leaves nothing to spend; H and the warm models fit, but at 10% less (the probe the tests
    use) one warm model would miss each time round, so memory has a measurable price."""
    demands = [ModelDemand("H", [Candidate("small", 10, 0.90, 0.001, 0.01),
                                 Candidate("big", 30, 0.90 + gain, 0.001, 0.02)])]
    demands += [ModelDemand(f"C{k}", [Candidate("only", 100, 0.90, 0.001, 0.01)])
                for k in range(8)]
    events = [(i / 5, "H") for i in range(1800 * 5)]  # 5 requests/s for 30 minutes
    events += [(4 * k + 20 * i + 1, f"C{k}") for k in range(5) for i in range(90)]
    events += [(60 * i + 30, f"C{5 + i % 3}") for i in range(30)]
    events.sort()
    return RequestTrace.from_names([t for t, _ in events], [n for _, n in events]), demands


def test_memadapt_buys_a_hot_models_upgrade_with_memory_the_working_set_wanted():
    tr, demands = _hot_and_cold(gain=0.09)
    off = simulate(tr, demands, get_policy("memadapt", probe=0.0), 550)
    on = simulate(tr, demands, get_policy("memadapt", probe=0.1), 550)
    # without priced upgrades the reserve for the cold models keeps H at its small variant
    assert off.policy_stats["upgrades"] == 0
    # with them H's upgrade (5 req/s x 0.09 per 20 bytes) outweighs, by far more than the
    # price, the misses 20 bytes would avoid (a warm model takes 100): H serves "big"
    assert on.policy_stats["priced_bytes"] >= 20
    assert on.effective_accuracy > off.effective_accuracy + 0.05
    # and the 20 bytes cost no warm model its place: the same misses, no stalls
    assert on.misses == off.misses and on.stalls == 0
    assert on.floor_violations == 0 and on.peak_bytes <= 550


def test_memadapt_does_not_buy_an_upgrade_worth_less_than_the_misses_it_risks():
    tr, demands = _hot_and_cold(gain=0.0001)
    off = simulate(tr, demands, get_policy("memadapt", probe=0.0), 550)
    r = simulate(tr, demands, get_policy("memadapt", probe=0.1), 550)
    # 5 req/s x 0.0001 per 20 bytes is less than 5x the misses 20 bytes avoid: by the end
    # (once the probe has seen a warm model miss) nothing is priced in, and no warm model
    # lost its place to the upgrade bought early on (before the probe had seen a miss)
    assert r.policy_stats["priced_bytes"] == 0
    assert r.policy_stats["priced_bytes_max"] >= 20
    assert r.misses == off.misses


@pytest.mark.parametrize("kw, what", [({"price": 0}, "price"), ({"price": -1.0}, "price"),
                                      ({"probe": 1.0}, "probe"), ({"probe": -0.1}, "probe")])
def test_memadapt_rejects_a_bad_price_or_probe(kw, what):
    with pytest.raises(PolicyError, match=f"memadapt: {what}"):
        get_policy("memadapt", **kw)
