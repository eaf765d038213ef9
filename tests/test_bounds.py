"""The miss-rate lower bound (PFOO-L and pooled FOO-L over smallest eligible variants) against
brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive.bounds import best_static_misses, irm_online_misses, miss_lower_bound
from adaptive.policies import list_policies, policy_class
from adaptive.select import Candidate, ModelDemand
from adaptive.simulate import compare, simulate
from adaptive.traces import BudgetTrace, RequestTrace


def optimal_misses(seq: list[int], sizes: list[int], budget: int,
                   bypass: bool = False, times: list[float] | None = None,
                   load_s: float = 0.0) -> int:
    """Exact optimum of demand-fetch caching with variable sizes: after each request the cache
    keeps any subset of what it held plus the requested model that fits -- which must include
    the requested model unless ``bypass`` (an execution cache serves from memory). With
    ``times``, a model loaded on a miss at ``t`` is ready at ``t + load_s``, and a request for
    it before then is a miss too (it waits for the load)."""
    times = list(times) if times is not None else [0.0] * len(seq)
    best: dict[frozenset, int] = {frozenset(): 0}  # {(model, ready time)}: fewest misses
    for m, t in zip(seq, times):
        nxt: dict[frozenset, int] = {}
        for held, cost in best.items():
            ready = dict(held)
            if m not in ready:
                ready[m] = t + load_s
                cost += 1
            elif ready[m] > t:
                cost += 1
            pool = sorted(ready)
            for r in range(len(pool) + 1):
                for keep in itertools.combinations(pool, r):
                    if not bypass and m not in keep:
                        continue
                    if sum(sizes[k] for k in keep) <= budget:
                        s = frozenset((k, ready[k]) for k in keep)
                        if cost < nxt.get(s, 1 << 30):
                            nxt[s] = cost
        best = nxt
    return min(best.values())


def _demands(sizes: list[int], small: bool) -> list[ModelDemand]:
    out = []
    for k, s in enumerate(sizes):
        cands = [Candidate("base", 2 * s, 0.9, 0.001, 0.01)]
        if small:
            cands.append(Candidate("small", s, 0.85, 0.001, 0.005))
        out.append(ModelDemand(f"m{k}", cands, floor=0.8))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 4), data=st.data())
def test_bound_never_exceeds_the_optimum_nor_any_policy(n, data):
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    seq = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=12))
    # gaps shorter than the small variant's 0.005 s load put requests inside a first load
    gaps = data.draw(st.lists(st.sampled_from([0.0, 0.001, 0.004, 0.006, 0.5, 2.0, 5.0]),
                              min_size=len(seq), max_size=len(seq)))
    budget = data.draw(st.integers(max(sizes), sum(sizes) + 1))
    ts = np.cumsum(gaps)
    tr = RequestTrace(ts, np.array(seq), np.ones(len(seq), np.int32),
                      tuple(f"m{k}" for k in range(n)))
    demands = _demands(sizes, small=True)
    b = miss_lower_bound(tr, demands, budget)
    assert b.served == len(seq)
    assert len(set(seq)) <= b.compulsory <= b.misses
    # every variant loading as fast as the fastest and as small as the smallest: a relaxation
    # of what the policies face, so its optimum is at most theirs
    opt = optimal_misses(seq, sizes, budget, times=ts.tolist(), load_s=0.005)
    assert b.misses <= opt <= optimal_misses(seq, sizes, budget, times=ts.tolist(),
                                             load_s=0.01)
    assert optimal_misses(seq, sizes, budget) <= opt
    # pooling instants relaxes FOO-L further; PFOO-L alone is looser still
    pooled = miss_lower_bound(tr, demands, budget, segments=3).misses
    assert miss_lower_bound(tr, demands, budget, segments=0).misses <= pooled <= b.misses
    assert optimal_misses(seq, sizes, budget, bypass=True) <= optimal_misses(seq, sizes, budget)
    for policy in list_policies():
        r = simulate(tr, demands, policy, budget)
        assert b.misses <= r.misses, policy


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_bound_holds_under_a_changing_budget(data):
    n = 4
    sizes = [2, 3, 4, 5]
    seq = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=40))
    ts = np.arange(len(seq), dtype=float)
    steps = data.draw(st.lists(st.integers(0, 14), min_size=1, max_size=4))
    budget = BudgetTrace(np.arange(len(steps)) * 7.0, np.array(steps))
    tr = RequestTrace(ts, np.array(seq), np.ones(len(seq), np.int32),
                      tuple(f"m{k}" for k in range(n)))
    demands = _demands(sizes, small=True)
    res = compare(tr, demands, list_policies(), budget, bound=True)
    bound = res.pop("bound")
    for name, r in res.items():
        assert bound.misses <= r.misses, name
        assert bound.rejected == r.rejected, name


def test_bound_is_tight_when_everything_fits_and_counts_reuse_otherwise():
    tr = RequestTrace.from_names([0, 1, 2, 3], list("ABAB"))
    demands = [ModelDemand(x, [Candidate("base", 10, 0.9)]) for x in "AB"]
    assert miss_lower_bound(tr, demands, 20).misses == 2  # compulsory only
    # room for one: every request holds its model at its own instant, nothing is left for
    # a reuse interval, so nothing hits (with bypass, PFOO-L would allow one hit)
    assert miss_lower_bound(tr, demands, 10).misses == 4
    assert optimal_misses([0, 1, 0, 1], [10, 10], 10) == 4
    assert optimal_misses([0, 1, 0, 1], [10, 10], 10, bypass=True) == 3
    assert miss_lower_bound(tr, demands, 5).served == 0


def test_foo_l_is_tighter_than_pfoo_l_where_one_instant_is_full():
    # B (2 bytes) then A (3 bytes) then B, A under 3 bytes: PFOO-L pools the spare bytes of
    # both B instants and lets B's reuse hit; at A's instant the cache is full, so FOO-L
    # (and the optimum) allows no hit
    tr = RequestTrace.from_names([0, 1, 2, 3], list("BABA"))
    demands = [ModelDemand("A", [Candidate("base", 3, 0.9)]),
               ModelDemand("B", [Candidate("base", 2, 0.9)])]
    assert miss_lower_bound(tr, demands, 3, segments=0).misses == 3
    assert miss_lower_bound(tr, demands, 3).misses == 4
    assert optimal_misses([1, 0, 1, 0], [3, 2], 3) == 4


def test_bound_row_in_compare_is_json_ready():
    import json

    tr = RequestTrace.from_names([0, 1, 2], list("ABA"))
    demands = [ModelDemand(x, [Candidate("base", 10, 0.9, 0.01, 0.1)]) for x in "AB"]
    res = compare(tr, demands, ["lru"], 10, bound=True)
    d = json.loads(json.dumps(res["bound"].to_dict()))
    # no bypass: B's request evicts A, so no policy hits
    assert d["policy"] == "bound" and d["miss_rate"] == pytest.approx(1.0)
    assert d["slo_attainment"] is None and d["effective_accuracy"] is None


def test_requests_during_a_first_load_are_compulsory():
    # A's load takes 0.5 s from its first request at 0: the requests at 0.1 and 0.4 wait for
    # it; the one at 0.5 finds it ready. Everything fits, so only those misses remain.
    tr = RequestTrace.from_names([0.0, 0.1, 0.4, 0.5, 1.0], list("AAAAB"))
    demands = [ModelDemand("A", [Candidate("base", 10, 0.9, 0.01, 0.8),
                                 Candidate("small", 5, 0.85, 0.01, 0.5)], floor=0.8),
               ModelDemand("B", [Candidate("base", 10, 0.9, 0.01, 0.1)])]
    b = miss_lower_bound(tr, demands, 100)
    assert (b.compulsory, b.misses) == (4, 4)
    for policy in list_policies():
        assert simulate(tr, demands, policy, 100).misses >= 4, policy
    # below A's floor the fast variant does not count: A's shortest eligible load is 0.8 s
    strict = [ModelDemand("A", demands[0].candidates, floor=0.88), demands[1]]
    assert miss_lower_bound(tr, strict, 100).compulsory == 5


def test_best_static_misses_is_the_knapsack_of_request_counts():
    # A: 3 requests, 6 bytes; B: 2 requests, 4 bytes; C: 2 requests, 4 bytes; budget 8.
    # Keeping B and C (each misses once) beats keeping A (misses once, B and C all 4).
    mib = 1 << 20
    tr = RequestTrace.from_names([0, 1, 2, 3, 4, 5, 6], list("AABBCCA"))
    demands = [ModelDemand(x, [Candidate("base", s * mib, 0.9)]) for x, s in zip("ABC", (6, 4, 4))]
    assert best_static_misses(tr, demands, 8 * mib) == 3 + 1 + 1
    assert best_static_misses(tr, demands, 14 * mib) == 3
    assert best_static_misses(tr, demands, 5 * mib) == 1 + 2  # A (6) is rejected
    budget = BudgetTrace(np.array([0.0]), np.array([8 * mib]))
    assert best_static_misses(tr, demands, budget) is None


def test_irm_bound_is_the_knapsack_of_request_counts_without_first_misses():
    # the trace above: {B, C} keeps 4 of 7 requests from missing, {A} only 3
    mib = 1 << 20
    tr = RequestTrace.from_names([0, 1, 2, 3, 4, 5, 6], list("AABBCCA"))
    demands = [ModelDemand(x, [Candidate("base", s * mib, 0.9)]) for x, s in zip("ABC", (6, 4, 4))]
    assert irm_online_misses(tr, demands, 8 * mib) == 3
    assert irm_online_misses(tr, demands, 14 * mib) == 0
    assert irm_online_misses(tr, demands, 5 * mib) == 2  # A rejected; one of B, C kept
    budget = BudgetTrace(np.array([0.0]), np.array([8 * mib]))
    assert irm_online_misses(tr, demands, budget) is None


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ladders", [False, True])
def test_no_online_policy_misses_less_than_the_irm_bound_on_independent_draws(seed, ladders):
    from adaptive.traces import synth

    names = [f"m{k}" for k in range(12)]
    if ladders:  # variants of many sizes: whole-model policies miss almost everything here
        rng = np.random.default_rng(seed)
        demands = [ModelDemand(x, [Candidate("big", int(s), 0.95, load_s=0.5),
                                   Candidate("small", int(s) // 3, 0.9, load_s=0.2)],
                               floor=0.85) for x, s in zip(names, rng.integers(30, 120, 12))]
        budget = int(sum(d.candidates[1].memory_bytes for d in demands) * 0.4)
    else:  # equal sizes: LFU learns the top 4 and comes within about 10% of the bound
        demands = [ModelDemand(x, [Candidate("base", 100, 0.9, load_s=0.05)]) for x in names]
        budget = 400
    tr = synth("zipf", names, 4000, seed=seed, duration_s=600)
    irm = irm_online_misses(tr, demands, budget)
    assert 0 < irm <= best_static_misses(tr, demands, budget)
    online = [p for p in list_policies() if not policy_class(p).offline]
    res = compare(tr, demands, online, budget, seed=seed)
    for p, r in res.items():
        assert r.misses >= irm, p
    if not ladders:  # the bound is not vacuous
        assert min(r.misses for r in res.values()) < 1.15 * irm


def test_bound_names_trace_models_without_profiles():
    from adaptive.errors import AdaptiveError

    tr = RequestTrace.from_names([0, 1], list("AB"), models=["A", "B", "idle"])
    demands = [ModelDemand("A", [Candidate("base", 10, 0.9)])]
    with pytest.raises(AdaptiveError, match=r"no profiles for trace models \['B'\]: give every"):
        miss_lower_bound(tr, demands, 20)
    assert best_static_misses(tr, demands, 20) is None
    assert irm_online_misses(tr, demands, 20) is None
