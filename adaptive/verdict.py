"""Does a policy beat every online alternative on one (trace, budget)? The checks the headline
makes, in one place for the benchmark and ``memadapt simulate``.

For the policy under test (``memadapt``) against every *competitor* (registered, online, not an
ablation: :func:`adaptive.policies.competitors`):

* ``late``: its miss + stall rate is no higher than any competitor's (a request that waits for
  a load or a swap counts against it either way);
* ``slo``: its SLO attainment is no lower;
* ``normalized``: its normalized accuracy is at least INFaaS's minus ``tolerance``;
* ``effective``: its effective accuracy is the highest (ties count);
* ``floors``: it served nothing below a floor;
* ``bound_ratio``: its miss rate over the ``bound`` row's (when that row is present).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adaptive.policies import competitors

__all__ = ["Verdict", "verdict"]

_EPS = 1e-12


@dataclass(frozen=True)
class Verdict:
    """The checks above; ``shortfalls`` says which failed and against whom."""

    policy: str
    late: bool
    slo: bool
    normalized: bool
    effective: bool
    floors: bool
    bound_ratio: float | None
    best_competitor: str | None
    shortfalls: tuple[str, ...] = field(default=())

    @property
    def holds(self) -> bool:
        return self.late and self.slo and self.normalized and self.effective and self.floors

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "holds": self.holds, "late": self.late,
                "slo": self.slo, "normalized": self.normalized, "effective": self.effective,
                "floors": self.floors, "bound_ratio": self.bound_ratio,
                "best_competitor": self.best_competitor, "shortfalls": list(self.shortfalls)}


def verdict(results: Mapping[str, Any], policy: str = "memadapt", *,
            tolerance: float = 0.005) -> Verdict:
    """Check ``results[policy]`` against the competitors among ``results`` (SimResults keyed
    by policy name, as :func:`adaptive.simulate.compare` returns them)."""
    me = results[policy]
    rivals = [p for p in competitors([p for p in results if p != "bound"]) if p != policy]
    short: list[str] = []
    late_ok = slo_ok = eff_ok = True

    def late(r: Any) -> float:
        return r.miss_rate + r.stall_rate

    for p in rivals:
        r = results[p]
        if late(me) > late(r) + _EPS:
            late_ok = False
            short.append(f"miss+stall {late(me):.4f} > {p} {late(r):.4f}")
        if me.slo_attainment < r.slo_attainment - _EPS:
            slo_ok = False
            short.append(f"SLO attainment {me.slo_attainment:.4f} < {p} "
                         f"{r.slo_attainment:.4f}")
        if me.effective_accuracy < r.effective_accuracy - _EPS:
            eff_ok = False
            short.append(f"effective accuracy {me.effective_accuracy:.4f} < {p} "
                         f"{r.effective_accuracy:.4f}")
    norm_ok = True
    if "infaas" in results and policy != "infaas":
        ref = results["infaas"].normalized_accuracy - tolerance
        norm_ok = me.normalized_accuracy >= ref - _EPS
        if not norm_ok:
            short.append(f"normalized accuracy {me.normalized_accuracy:.4f} < infaas - "
                         f"{tolerance} ({ref:.4f})")
    if me.floor_violations:
        short.append(f"{me.floor_violations} floor violations")
    ratio = None
    if "bound" in results:
        b = results["bound"].miss_rate
        ratio = me.miss_rate / b if b > 0 else (1.0 if me.miss_rate == 0 else float("inf"))
    best = min(rivals, key=lambda p: (late(results[p]), -results[p].effective_accuracy),
               default=None)
    return Verdict(policy=policy, late=late_ok, slo=slo_ok, normalized=norm_ok,
                   effective=eff_ok, floors=me.floor_violations == 0, bound_ratio=ratio,
                   best_competitor=best, shortfalls=tuple(short))
