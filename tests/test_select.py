"""Selection (adaptive.select) checked against brute force and a capacity DP; units; lean import.

Instances with dyadic rates and accuracies (k/16, multiples of 0.5) make every sum exact in
floating point, so there the solver must match the reference *exactly*, tie-breaks included.
"""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive import (
    Candidate,
    InfeasibleBudget,
    ModelDemand,
    Plan,
    format_size,
    parse_size,
    select,
)
from adaptive.select import check_feasible, smallest_eligible

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- instances and references ----------------------------------------------------------------

@st.composite
def instances(draw, max_models: int = 6, max_variants: int = 4, dyadic: bool = False):
    """(demands, budget); memories 0..100 bytes so that budgets bite."""
    demands = []
    for i in range(draw(st.integers(0, max_models))):
        cands = []
        for j in range(draw(st.integers(0, max_variants))):
            mem = draw(st.integers(0, 100))
            if dyadic:
                acc = draw(st.integers(0, 16)) / 16
            else:
                acc = draw(st.floats(0, 1, allow_nan=False))
            cands.append(Candidate(f"v{j}", mem, acc))
        floor = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
        if dyadic:
            rate = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]))
        else:
            rate = draw(st.one_of(st.just(0.0), st.floats(0, 10, allow_nan=False)))
        demands.append(ModelDemand(f"m{i}", cands, floor=floor, rate=rate))
    total = sum(max((c.memory_bytes for c in d.candidates), default=0) for d in demands)
    return demands, draw(st.integers(0, total + 10))


@st.composite
def residents(draw, demands):
    """A resident mapping over some of the models (None: explicitly not resident)."""
    out = {}
    for d in demands:
        if draw(st.booleans()):
            out[d.model] = draw(st.sampled_from([None] + [c.variant for c in d.candidates]))
    return out


def _keep_count(demands, choice, resident):
    """Models whose residency stays as ``resident`` says (absent = not resident)."""
    return sum(choice[d.model] == resident.get(d.model) for d in demands)


def _plan_key(demands, plan, objective, resident):
    keep = _keep_count(demands, plan.choice, resident) if resident is not None else 0
    return (plan.served_rate if objective == "misses" else 0.0, plan.utility, keep,
            -plan.memory_bytes)


def brute_force(demands, budget, objective="accuracy", resident=None):
    """Best (served, utility, kept, -memory) over every feasible plan: the documented order."""
    options = [[None] + (list(d.eligible()) if d.rate > 0 else []) for d in demands]
    best = None
    for combo in itertools.product(*options):
        memory = sum(c.memory_bytes for c in combo if c is not None)
        if memory > budget:
            continue
        chosen = [(d, c) for d, c in zip(demands, combo) if c is not None]
        served = math.fsum(d.rate for d, _ in chosen)
        utility = math.fsum(d.rate * c.accuracy for d, c in chosen)
        choice = {d.model: (c.variant if c else None) for d, c in zip(demands, combo)}
        keep = _keep_count(demands, choice, resident) if resident is not None else 0
        key = (served if objective == "misses" else 0.0, utility, keep, -memory)
        if best is None or key > best:
            best = key
    return best


def capacity_dp(demands, budget, objective="accuracy"):
    """Reference for instances too big for brute force: DP over every byte of capacity."""
    best = [(0.0, 0.0)] * (budget + 1)  # best (served, utility) within that many bytes
    for d in demands:
        row = list(best)
        for c in d.eligible() if d.rate > 0 else ():
            gain = (d.rate if objective == "misses" else 0.0, d.rate * c.accuracy)
            for cap in range(c.memory_bytes, budget + 1):
                prev = best[cap - c.memory_bytes]
                value = (prev[0] + gain[0], prev[1] + gain[1])
                if value > row[cap]:
                    row[cap] = value
        best = row
    return best[budget]


def check_plan(demands, budget, plan: Plan):
    """The hard rules every plan obeys, whatever the path."""
    assert isinstance(plan, Plan)
    assert set(plan.choice) == {d.model for d in demands}
    assert set(plan.details) == set(plan.choice)
    memory = 0
    for d in demands:
        variant, cand = plan.choice[d.model], plan.details[d.model]
        if variant is None:
            assert cand is None
            continue
        assert cand in d.candidates and cand.variant == variant
        assert cand.accuracy >= d.floor, "a candidate under its floor was chosen"
        assert d.rate > 0
        memory += cand.memory_bytes
    assert plan.memory_bytes == memory <= budget == plan.budget_bytes
    chosen = [(d, plan.details[d.model]) for d in demands if plan.details[d.model] is not None]
    assert plan.utility == pytest.approx(sum(d.rate * c.accuracy for d, c in chosen))
    assert plan.served_rate == pytest.approx(sum(d.rate for d, _ in chosen))


def realistic(rng: random.Random, n: int = 100, v: int = 10):
    """A server-sized instance: 5-500 MB bases, variants trading memory for accuracy, Zipf."""
    demands = []
    for i in range(n):
        base_mem = math.exp(rng.uniform(math.log(5e6), math.log(500e6)))
        base_acc = rng.uniform(0.75, 0.95)
        cands = [Candidate("base", int(base_mem), base_acc)]
        for j in range(1, v):
            factor = rng.uniform(0.03, 1.0)
            acc = base_acc - (1 - factor) * rng.uniform(0.0, 0.3)
            cands.append(Candidate(f"v{j}", int(base_mem * factor), min(0.95, max(0.5, acc))))
        demands.append(ModelDemand(f"m{i}", cands, floor=base_acc - rng.uniform(0.05, 0.2),
                                   rate=(i + 1) ** -rng.uniform(0.8, 1.2)))
    total = sum(d.candidates[0].memory_bytes for d in demands)
    return demands, int(total * rng.uniform(0.1, 1.0))


# --- properties -----------------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), inst=instances(max_models=10, max_variants=6),
       objective=st.sampled_from(["accuracy", "misses"]),
       exact=st.sampled_from([True, False, None]))
def test_every_plan_is_feasible(data, inst, objective, exact):
    demands, budget = inst
    resident = data.draw(st.one_of(st.none(), residents(demands)))
    plan = select(demands, budget, objective=objective, exact=exact, resident=resident)
    check_plan(demands, budget, plan)
    assert plan.objective == objective


@SETTINGS
@given(inst=instances())
def test_exact_matches_brute_force(inst):
    demands, budget = inst
    plan = select(demands, budget, exact=True)
    check_plan(demands, budget, plan)
    assert plan.exact
    best = brute_force(demands, budget)[1]
    assert plan.utility == pytest.approx(best, rel=1e-9, abs=1e-12)
    fast = select(demands, budget, exact=False)
    assert fast.utility <= plan.utility * (1 + 1e-9) + 1e-12


@SETTINGS
@given(data=st.data(), inst=instances(dyadic=True),
       objective=st.sampled_from(["accuracy", "misses"]))
def test_exact_matches_brute_force_with_tie_breaks(data, inst, objective):
    """Exact sums: objective, then fewest residency changes, then least memory, exactly."""
    demands, budget = inst
    resident = data.draw(st.one_of(st.none(), residents(demands)))
    plan = select(demands, budget, objective=objective, exact=True, resident=resident)
    check_plan(demands, budget, plan)
    assert _plan_key(demands, plan, objective, resident) == \
        brute_force(demands, budget, objective, resident)


def test_exact_matches_capacity_dp_on_larger_instances():
    """20-40 models: the reduction and the DP, not just the greedy, are exercised."""
    rng = random.Random(11)
    for _ in range(12):
        shapes = [[Candidate(f"v{j}", rng.randint(1, 60), rng.randint(4, 16) / 16)
                   for j in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 4))]
        demands = [ModelDemand(f"m{i}", rng.choice(shapes), floor=rng.choice([0, 0.5]),
                               rate=rng.choice([0.5, 1, 2, 3]))
                   for i in range(rng.randint(20, 40))]
        total = sum(max(c.memory_bytes for c in d.candidates) for d in demands)
        budget = rng.randint(total // 10, total)
        for objective in ("accuracy", "misses"):
            plan = select(demands, budget, objective=objective, exact=True)
            served, utility = capacity_dp(demands, budget, objective)
            assert plan.exact
            assert plan.utility == pytest.approx(utility, rel=1e-12)
            if objective == "misses":
                assert plan.served_rate == served


def test_fast_path_within_one_percent_on_average():
    rng = random.Random(2024)
    gaps = []
    for _ in range(200):
        demands, budget = realistic(rng, n=rng.choice([10, 30, 100]), v=rng.choice([3, 10]))
        exact = select(demands, budget, exact=True)
        fast = select(demands, budget, exact=False)
        check_plan(demands, budget, fast)
        assert fast.utility <= exact.utility * (1 + 1e-9)
        gaps.append((exact.utility - fast.utility) / exact.utility)
    assert sum(gaps) / len(gaps) < 0.01
    assert max(gaps) < 0.05


@SETTINGS
@given(data=st.data(), inst=instances(max_models=8),
       objective=st.sampled_from(["accuracy", "misses"]), exact=st.booleans())
def test_deterministic_and_independent_of_input_order(data, inst, objective, exact):
    demands, budget = inst
    resident = data.draw(st.one_of(st.none(), residents(demands)))
    plan = select(demands, budget, objective=objective, exact=exact, resident=resident)
    again = select(demands, budget, objective=objective, exact=exact, resident=resident)
    assert again == plan and again.details == plan.details
    shuffled = data.draw(st.permutations(demands))
    shuffled = [ModelDemand(d.model, data.draw(st.permutations(d.candidates)), d.floor, d.rate)
                for d in shuffled]
    other = select(shuffled, budget, objective=objective, exact=exact, resident=resident)
    assert other.choice == plan.choice
    assert other.utility == plan.utility and other.memory_bytes == plan.memory_bytes


# --- documented behaviour on small hand-made cases --------------------------------------------

def test_floor_is_respected_even_when_a_lower_variant_pays_more():
    demands = [
        ModelDemand("a", [Candidate("big", 100, 0.9), Candidate("tiny", 10, 0.6)], floor=0.8,
                    rate=10.0),
        ModelDemand("b", [Candidate("base", 60, 0.7)], rate=1.0),
    ]
    # "tiny" + "b" would serve 10*0.6 + 0.7 = 6.7 within 70 bytes; the floor forbids it.
    for exact in (True, False):
        plan = select(demands, 70, exact=exact)
        assert plan.choice == {"a": None, "b": "base"}
        plan = select(demands, 100, exact=exact)
        assert plan.choice == {"a": "big", "b": None}


def test_misses_serves_more_requests_before_accuracy():
    demands = [
        ModelDemand("a", [Candidate("full", 100, 0.95), Candidate("small", 50, 0.55)], rate=1),
        ModelDemand("b", [Candidate("full", 50, 0.3)], rate=1),
    ]
    by_accuracy = select(demands, 100)  # 0.95 beats 0.55 + 0.3
    assert by_accuracy.choice == {"a": "full", "b": None}
    assert (by_accuracy.utility, by_accuracy.served_rate) == (0.95, 1.0)
    by_misses = select(demands, 100, objective="misses")  # two models served beat one
    assert by_misses.choice == {"a": "small", "b": "full"}
    assert by_misses.served_rate == 2.0 and by_misses.utility == pytest.approx(0.85)
    assert (by_accuracy.objective, by_misses.objective) == ("accuracy", "misses")


def test_resident_variant_wins_ties_but_never_utility():
    twin = [Candidate("x", 50, 0.8)]
    demands = [ModelDemand("a", twin), ModelDemand("b", twin)]
    assert select(demands, 60).choice == {"a": "x", "b": None}  # fixed order without history
    assert select(demands, 60, resident={"b": "x"}).choice == {"a": None, "b": "x"}
    # Keeping the resident variant never costs utility.
    demands = [ModelDemand("a", [Candidate("big", 100, 0.9), Candidate("small", 40, 0.7)])]
    assert select(demands, 100, resident={"a": "small"}).choice == {"a": "big"}
    # Among equal utility, the least memory wins.
    demands = [ModelDemand("a", [Candidate("fat", 90, 0.8), Candidate("lean", 40, 0.8)])]
    assert select(demands, 100).choice == {"a": "lean"}


def test_replanning_with_the_plans_residents_is_stable():
    demands, budget = realistic(random.Random(5), n=40)
    plan = select(demands, budget)
    assert select(demands, budget, resident=plan.resident()).choice == plan.choice
    assert all(v is not None for v in plan.resident().values())


def test_zero_rate_models_are_never_resident():
    demands = [ModelDemand("idle", [Candidate("x", 1, 0.9)], rate=0.0),
               ModelDemand("busy", [Candidate("x", 1, 0.9)], rate=1.0)]
    for exact in (True, False):
        plan = select(demands, 1000, exact=exact, resident={"idle": "x"})
        assert plan.choice == {"idle": None, "busy": "x"}


def test_empty_and_zero_budget():
    assert select([], 0) == Plan({}, 0, 0.0, 0, True, {})
    demands = [ModelDemand("a", [Candidate("x", 1, 0.9), Candidate("free", 0, 0.5)])]
    assert select(demands, 0).choice == {"a": "free"}  # 0 bytes still fit
    assert select(demands, 0.0).budget_bytes == 0


def test_node_limit_falls_back_to_the_best_plan_found():
    # Identical models whose variants lie on one line: every mix ties, the DP explodes.
    line = [Candidate(f"v{j}", 1000 - 83 * j, 0.95 - 0.03 * j) for j in range(10)]
    demands = [ModelDemand(f"m{i:02d}", line) for i in range(60)]
    budget = 60 * 1000 * 37 // 100
    plan = select(demands, budget, exact=True, node_limit=50)
    check_plan(demands, budget, plan)
    assert not plan.exact
    assert plan.utility >= select(demands, budget, exact=False).utility - 1e-9


def test_exact_none_solves_small_instances_exactly():
    demands, budget = realistic(random.Random(1), n=20)
    assert select(demands, budget).exact
    assert not select(demands, budget, exact=False).exact


# --- validation, feasibility helpers ------------------------------------------------------------

def test_validation_errors_name_the_bad_value():
    demands = [ModelDemand("a", [Candidate("x", 10, 0.9)])]
    with pytest.raises(ValueError, match="-1"):
        select(demands, -1)
    with pytest.raises(ValueError, match="duplicate model name 'a'"):
        select(demands + [ModelDemand("a", [])], 10)
    with pytest.raises(ValueError, match="unknown objective 'latency'.*accuracy"):
        select(demands, 10, objective="latency")
    with pytest.raises(ValueError, match="resident names model 'zz'"):
        select(demands, 10, resident={"zz": "x"})
    with pytest.raises(ValueError, match="resident variant 'y' of model 'a'"):
        select(demands, 10, resident={"a": "y"})
    with pytest.raises(ValueError, match="whole number"):
        select(demands, 1.5)
    with pytest.raises(TypeError, match="parse_size"):
        select(demands, "1GiB")
    with pytest.raises(TypeError, match="ModelDemand"):
        select([("a", 1)], 10)
    with pytest.raises(ValueError, match="node_limit"):
        select(demands, 10, node_limit=0)


def test_smallest_eligible_and_check_feasible():
    d = ModelDemand("m", [Candidate("full", 100, 0.9), Candidate("int8", 30, 0.85),
                          Candidate("tiny", 5, 0.5)], floor=0.8)
    assert smallest_eligible(d).variant == "int8"
    assert smallest_eligible(ModelDemand("e", [])) is None
    check_feasible([d], 30, ["m"])
    check_feasible([d], 0, [])
    with pytest.raises(InfeasibleBudget) as info:
        check_feasible([d], 29, ["m"])
    err = info.value
    assert (err.model, err.smallest_variant, err.smallest_bytes, err.budget_bytes, err.floor) == \
        ("m", "int8", 30, 29, 0.8)
    assert "'int8'" in str(err) and "raise the budget or lower the floor" in str(err)
    strict = ModelDemand("s", [Candidate("full", 1, 0.7)], floor=0.8)
    with pytest.raises(InfeasibleBudget, match="no variant") as info:
        check_feasible([strict], 100, "s")  # a single name is not split into characters
    assert info.value.smallest_variant is None
    with pytest.raises(ValueError, match="required model 'zz'"):
        check_feasible([d], 100, ["zz"])


# --- units --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("1.5 GB", 1_500_000_000), ("100", 100),
    ("2kb", 2000), ("2KiB", 2048), ("3 tib", 3 * 2**40), ("1TB", 10**12), (" 7 B ", 7),
    ("0.5", 0), ("1.5B", 2), (".5KiB", 512), ("10mib", 10 * 2**20), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "-1GiB", "1.2.3MB", "12 parsecs", "1e9", "1 G"])
def test_parse_size_rejects_bad_input_listing_units(bad):
    with pytest.raises(ValueError, match="KiB, MiB, GiB, TiB"):
        parse_size(bad)


def test_parse_size_types():
    with pytest.raises(TypeError):
        parse_size(1.5)
    with pytest.raises(ValueError):
        parse_size(-1)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1024, "1.0 KiB"), (512 * 2**20, "512.0 MiB"),
    (3 * 2**29, "1.5 GiB"), (2**20 - 1, "1.0 MiB"), (5 * 2**40, "5.0 TiB"), (-2048, "-2.0 KiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


@given(st.integers(0, 2**50))
def test_format_then_parse_is_close(n):
    assert parse_size(format_size(n).replace(" ", "")) == pytest.approx(n, rel=0.05, abs=1)


# --- packaging ----------------------------------------------------------------------------------

def test_import_adaptive_stays_lean():
    code = ("import sys, adaptive; heavy = [m for m in ('torch', 'onnxruntime', 'onnx') "
            "if m in sys.modules]; assert not heavy, heavy; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
