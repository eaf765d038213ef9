"""Eviction experts (adaptive.experts): each ghost order does what its name says, and the
experts follow the order that misses least on the traffic they see."""

from __future__ import annotations

from adaptive.admission import Rates
from adaptive.experts import ORDERS, EvictionExperts


def _feed(experts: EvictionExperts, rates: Rates, seq, budget: float) -> None:
    for t, m in seq:
        rates.seen(m, t)  # as the policies do: the rate first, then the experts
        experts.request(m, t, budget)


def test_a_timer_cycle_makes_the_forecast_win_over_recency():
    """Three models called in a fixed cycle with room for two: LRU always evicts the next
    one asked for and misses every request; the forecast keeps the one due soonest."""
    rates = Rates(3, 120.0)
    e = EvictionExperts([1.0, 1.0, 1.0], rates, half_life_s=600.0)
    _feed(e, rates, [(float(t), t % 3) for t in range(300)], budget=2.0)
    k = {o: i for i, o in enumerate(ORDERS)}
    assert e.score[k["next"]] < 0.75 * e.score[k["lru"]]
    assert ORDERS[e.order()] == "next"
    # at t=299 model 2 was just asked for; 0 is due at 300 and 1 at 301: give up 2
    assert e.peek([0, 1, 2]) == 2


def test_irregular_gaps_fall_back_to_recency_times_bytes():
    """A model with regular gaps is ranked by its forecast wait; one with irregular gaps has
    no forecast and is ranked by the time since its last request (times its bytes)."""
    rates = Rates(2, 120.0)
    e = EvictionExperts([1.0, 2.0], rates)
    _feed(e, rates, sorted([(0.0, 0), (10.0, 0), (20.0, 0), (30.0, 0),
                            (0.5, 1), (3.0, 1), (20.0, 1), (21.0, 1), (28.0, 1)]), budget=10.0)
    key = e._next_key(31.0)
    assert key(0) == -9.0  # due at 40: 9 s away
    assert key(1) == -(31.0 - 28.0) * 2.0  # idle 3 s, 2 bytes (its forecast would say 2.4 s)
    # a model asked for once has no gap yet: recency too, not "given up first"
    e2 = EvictionExperts([1.0], Rates(1, 120.0))
    _feed(e2, e2.rates, [(5.0, 0)], budget=10.0)
    assert e2._next_key(8.0)(0) == -3.0
