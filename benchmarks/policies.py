"""Headline benchmark: memadapt against every caching policy a user would pick instead.

For each population of model families (``benchmarks/populations/*.json``: the demo store's
measured families, CPU-served CNNs and sibling-model families built from published numbers),
each trace kind (zipf, azure, bursty, diurnal) and each budget from 10% to 100% of the memory
all models need at their most accurate variant, every registered policy replays the same trace
over a population of models cloned from the families, beside a lower bound on any policy's
misses (``bound``: PFOO-L, tightened by pooled FOO-L where it is above the compulsory
misses). Each cell gets :func:`adaptive.verdict.verdict`: does memadapt miss + stall no more
than every online competitor (INFaaS first), meet SLOs as often, keep INFaaS's normalized
accuracy, serve the highest effective accuracy, and how far is it from the bound.

Writes ``results/policies.json`` (every row and verdict), ``results/policies.md`` (the
headline, where it falls short and why, and the tables) and ``results/policies-<pop>.png``.

Run:  python benchmarks/policies.py                    (about 5 min on 2 cores)
      python benchmarks/policies.py --quick            (one population, two traces, 2 min)
      python benchmarks/policies.py --profiles FILE.json   (your own families)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptive.bounds import best_static_misses, irm_online_misses  # noqa: E402
from adaptive.catalog import demands_from_json  # noqa: E402
from adaptive.policies import competitors, list_policies, policy_class  # noqa: E402
from adaptive.report import accuracy_lost, best_static_summary  # noqa: E402
from adaptive.select import ModelDemand  # noqa: E402
from adaptive.simulate import clone_population, compare  # noqa: E402
from adaptive.traces import synth  # noqa: E402
from adaptive.verdict import verdict  # noqa: E402

log = logging.getLogger("benchmarks.policies")

HERE = Path(__file__).resolve().parent
#: trace kinds whose requests are independent draws from a fixed popularity: there no online
#: policy expects fewer misses than adaptive.bounds.irm_online_misses
IRM_KINDS = ("zipf", "diurnal")
POPULATIONS = {"demo": HERE / "populations" / "demo.json",
               "cpu_cnn": HERE / "populations" / "cpu_cnn.json",
               "siblings": HERE / "populations" / "siblings.json"}
METRICS = ("miss_rate", "stall_rate", "slo_attainment", "goodput", "effective_accuracy",
           "normalized_accuracy", "mean_accuracy", "mean_latency_s", "p99_latency_s",
           "load_delay_over_exec", "bytes_loaded", "floor_violations", "rejected", "swaps",
           "evictions", "loads", "wall_s", "best_accuracy", "accuracy_lost_late",
           "accuracy_lost_rungs")


def full_bytes(demands: list[ModelDemand] | tuple[ModelDemand, ...]) -> int:
    """The 100% budget: every model at its base variant (the candidate named like its
    family; for a family of siblings, or without one, the most accurate eligible)."""
    total = 0
    for d in demands:
        family = d.model.split("#")[0]
        base = next((c for c in d.candidates if c.variant == family), None)
        total += (base or max(d.eligible(), key=lambda c: (c.accuracy, c.memory_bytes))
                  ).memory_bytes
    return total


def smallest_bytes(demands: list[ModelDemand] | tuple[ModelDemand, ...]) -> int:
    """Every model's smallest eligible variant together: from this budget on a variant-aware
    cache can hold every model and only compulsory misses remain."""
    return sum(min(c.memory_bytes for c in d.eligible()) for d in demands)


def run_population(name: str, families: list[ModelDemand], args: argparse.Namespace,
                   policies: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    population = clone_population(families, args.models, seed=args.seed)
    names = [d.model for d in population]
    total = full_bytes(population)
    rows: list[dict[str, Any]] = []
    compulsory = {}
    for kind in args.kinds:
        trace = synth(kind, names, args.requests, seed=args.seed, duration_s=args.duration)
        compulsory[kind] = int((trace.counts() > 0).sum()) / max(len(trace), 1)
        for frac in args.fractions:
            budget = int(frac * total)
            res = compare(trace, population, policies, budget, seed=args.seed, bound=True)
            v = verdict(res)
            b = res["bound"]
            static = best_static_misses(trace, population, budget)
            served = b.hits + b.misses
            static_rate = static / served if static is not None and served else None
            irm = irm_online_misses(trace, population, budget) if kind in IRM_KINDS else None
            irm_rate = irm / served if irm is not None and served else None
            for p, r in res.items():
                rows.append({"population": name, "kind": kind, "budget_fraction": frac,
                             "budget_bytes": budget, "policy": p,
                             **{k: _num(getattr(r, k)) for k in METRICS},
                             **{f"stat_{k}": val for k, val in r.policy_stats.items()},
                             **({"best_static_miss_rate": static_rate,
                                 "irm_online_miss_rate": irm_rate} if p == "bound" else {}),
                             **({"verdict": v.to_dict()} if p == "memadapt" else {})})
            log.info("%s %s %3.0f%%: %s%s", name, kind, 100 * frac,
                     "holds" if v.holds else "SHORT: ",
                     "" if v.holds else "; ".join(v.shortfalls))
    meta = {"population": name, "families": [_family(d) for d in families],
            "models": len(population), "full_bytes": total,
            "smallest_bytes": smallest_bytes(population), "compulsory_miss_rate": compulsory}
    return rows, meta


def _num(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _family(d: ModelDemand) -> dict[str, Any]:
    return {"model": d.model, "floor": d.floor, "slo_s": d.slo_s,
            "candidates": [c.__dict__ for c in d.candidates]}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Cells where each check holds, the failing cells, and bound ratios."""
    cells = [r for r in rows if r["policy"] == "memadapt"]
    checks = ("late", "slo", "normalized", "effective", "floors")
    out: dict[str, Any] = {"cells": len(cells),
                           "holds": sum(r["verdict"]["holds"] for r in cells),
                           **{c: sum(r["verdict"][c] for r in cells) for c in checks}}
    out["short"] = [{"population": r["population"], "kind": r["kind"],
                     "budget_fraction": r["budget_fraction"],
                     "shortfalls": r["verdict"]["shortfalls"]}
                    for r in cells if not r["verdict"]["holds"]]
    by = {(r["population"], r["kind"], r["budget_fraction"]): r for r in rows
          if r["policy"] == "bound"}
    ratios = []
    for r in cells:
        b = by[(r["population"], r["kind"], r["budget_fraction"])]
        comp = r["verdict"]["bound_ratio"]
        # the ratio is only a claim where the bound is above the compulsory misses
        above = b["miss_rate"] > 1.05 * b["stat_compulsory_miss_rate"]
        ratios.append({"population": r["population"], "kind": r["kind"],
                       "budget_fraction": r["budget_fraction"], "bound": b["miss_rate"],
                       "memadapt": r["miss_rate"], "ratio": comp, "above_compulsory": above})
    out["bound_ratios"] = ratios
    hard = [x["ratio"] for x in ratios if x["above_compulsory"] and x["ratio"] is not None]
    out["bound_ratio_max"] = max(hard) if hard else None
    out["bound_ratio_median"] = float(np.median(hard)) if hard else None
    # how far the offline reference itself is from the bound, for scale
    bel = {(r["population"], r["kind"], r["budget_fraction"]): r["miss_rate"] for r in rows
           if r["policy"] == "belady"}
    bel_ratios = [bel[(x["population"], x["kind"], x["budget_fraction"])] / x["bound"]
                  for x in ratios if x["above_compulsory"] and x["bound"] > 0
                  and (x["population"], x["kind"], x["budget_fraction"]) in bel]
    out["belady_bound_ratio_median"] = float(np.median(bel_ratios)) if bel_ratios else None
    # on independent draws from a fixed popularity (zipf; diurnal varies only their rate) the
    # best fixed set chosen knowing the request counts is about the best an online policy can
    # expect: how far that is from the bound, and memadapt from it
    def bound_row(x: dict[str, Any]) -> dict[str, Any]:
        return by[(x["population"], x["kind"], x["budget_fraction"])]

    irm = [(x, bound_row(x).get("best_static_miss_rate"), bound_row(x).get("irm_online_miss_rate"))
           for x in ratios if x["kind"] in IRM_KINDS and x["above_compulsory"]]
    irm = [(x, st, on) for x, st, on in irm if st and on]
    out["static_irm"] = [{"population": x["population"], "kind": x["kind"],
                          "budget_fraction": x["budget_fraction"], "bound": x["bound"],
                          "best_static": st, "irm_online": on, "memadapt": x["memadapt"],
                          "static_over_bound": st / x["bound"],
                          "irm_over_bound": on / x["bound"],
                          "memadapt_over_static": x["memadapt"] / st,
                          "memadapt_over_irm": x["memadapt"] / on} for x, st, on in irm]
    if irm:
        z = out["static_irm"]
        sb = [y["static_over_bound"] for y in z]
        ob = [y["irm_over_bound"] for y in z]
        ms = [y["memadapt_over_static"] for y in z]
        mo = [y["memadapt_over_irm"] for y in z]
        out["static_irm_summary"] = {
            "kinds": sorted({y["kind"] for y in z}), "cells": len(sb),
            "static_over_bound_median": float(np.median(sb)),
            "static_over_bound_min": min(sb), "static_over_bound_max": max(sb),
            "memadapt_over_static_median": float(np.median(ms)),
            "memadapt_over_static_max": max(ms),
            "static_over_1_3": sum(1 for x in sb if x > 1.3),
            "irm_over_bound_median": float(np.median(ob)),
            "irm_over_bound_min": min(ob), "irm_over_bound_max": max(ob),
            "irm_over_1_3": sum(1 for x in ob if x > 1.3),
            "memadapt_over_irm_median": float(np.median(mo)),
            "memadapt_over_irm_max": max(mo)}
    return out


def markdown(report: dict[str, Any]) -> str:
    meta, rows, s = report["meta"], report["results"], report["summary"]
    pols = meta["policies"]
    comp = competitors(pols)
    lines = ["# Policies: memadapt against what a user would pick instead", "",
             f"{meta['requests']:,} requests per trace over {meta['duration_s']:.0f} s, "
             f"{meta['models']} models cloned from each population's families, seed "
             f"{meta['seed']}; budgets are fractions of all models at their base variant. "
             f"Online competitors: {', '.join(['infaas'] + [p for p in comp if p != 'infaas'])}"
             f"; references: belady (offline Belady-Size) and bound (lower bound on any "
             f"policy's misses: PFOO-L, tightened by pooled FOO-L where it is above the "
             f"compulsory misses; adaptive/bounds.py). Ablations: "
             f"{', '.join(p for p in pols if policy_class(p).ablation)}. "
             f"Sweep took {meta['sweep_s']:.0f} s.", "",
             "## Headline", "",
             f"memadapt meets every check in **{s['holds']} of {s['cells']}** cells "
             f"(miss + stall <= every competitor: {s['late']}; SLO attainment >= every "
             f"competitor: {s['slo']}; normalized accuracy >= infaas - 0.005: "
             f"{s['normalized']}; highest effective accuracy: {s['effective']}; no floor "
             f"violations: {s['floors']}).", ""]
    if s["bound_ratio_max"] is not None:
        lines += [f"Miss rate over the bound, where the bound is above the compulsory "
                  f"misses: median {s['bound_ratio_median']:.2f}, worst "
                  f"{s['bound_ratio_max']:.2f} (offline Belady-Size: median "
                  f"{s['belady_bound_ratio_median']:.2f}).", ""]
    z = s.get("static_irm_summary")
    if z:
        lines += [best_static_summary(z), "",
                  "| population | trace | budget | bound | online bound (IRM) | best fixed set "
                  "| memadapt | online bound / bound | memadapt / online bound |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {y['population']} | {y['kind']} | {y['budget_fraction']:.0%} | "
                  f"{y['bound']:.4f} | {y['irm_online']:.4f} | {y['best_static']:.4f} | "
                  f"{y['memadapt']:.4f} | {y['irm_over_bound']:.2f} | "
                  f"{y['memadapt_over_irm']:.2f} |" for y in s["static_irm"]]
        lines.append("")
    if s["short"]:
        lines += ["### Where memadapt falls short", "",
                  "Where effective accuracy goes: the best variant's accuracy on every request, "
                  "less what late (or rejected) requests lose and what smaller variants lose "
                  "(`accuracy_lost_late` / `accuracy_lost_rungs`), for memadapt and the online "
                  "policy with the highest effective accuracy.", "",
                  "| population | trace | budget | shortfalls | lost late / to rungs: memadapt "
                  "| best online |", "|---|---|---:|---|---:|---:|"]
        for x in s["short"]:
            cell = {r["policy"]: r for r in rows if r["population"] == x["population"]
                    and r["kind"] == x["kind"] and r["budget_fraction"] == x["budget_fraction"]}
            top = max(comp, key=lambda p, cell=cell: cell[p]["effective_accuracy"])
            lines.append(f"| {x['population']} | {x['kind']} | {x['budget_fraction']:.0%} | "
                         f"{'; '.join(x['shortfalls'])} | {accuracy_lost(cell['memadapt'])} | "
                         f"{top} {accuracy_lost(cell[top])} |")
        lines.append("")
    for pm in report["populations"]:
        pop = pm["population"]
        lines += [f"## Population `{pop}`", "",
                  f"Families: {', '.join(f['model'] for f in pm['families'])}; "
                  f"100% = {pm['full_bytes'] / 1e9:.2f} GB; all smallest eligible variants "
                  f"= {pm['smallest_bytes'] / pm['full_bytes']:.0%} of it. "
                  f"Source: {meta['sources'][pop]}", ""]
        shown = ["memadapt", "infaas"] + [p for p in comp if p != "infaas"] + [
            p for p in pols if p not in comp and p != "memadapt"] + ["bound"]
        for key, title, fmt in (("late", "miss + stall rate", "{:.4f}"),
                                ("effective_accuracy", "effective accuracy", "{:.4f}"),
                                ("slo_attainment", "SLO attainment", "{:.4f}"),
                                ("p99_latency_s", "p99 latency (ms)", "{:.0f}")):
            for kind in meta["kinds"]:
                at = [r for r in rows if r["population"] == pop and r["kind"] == kind]
                if not at:
                    continue
                cols = [p for p in shown if any(r["policy"] == p for r in at)]
                if key != "late":
                    cols = [p for p in cols if p != "bound"]
                lines += [f"### {pop} / {kind}: {title}", "",
                          "| budget | " + " | ".join(cols) + " |",
                          "|---:|" + "---:|" * len(cols)]
                for frac in meta["fractions"]:
                    cell = {r["policy"]: r for r in at if r["budget_fraction"] == frac}
                    vals = []
                    for p in cols:
                        r = cell[p]
                        if key == "late":
                            x = r["miss_rate"] + r["stall_rate"]
                        else:
                            x = r[key]
                            if x is not None and key.endswith("_s"):
                                x *= 1000
                        vals.append("-" if x is None else fmt.format(x))
                    lines.append(f"| {frac:.0%} | " + " | ".join(vals) + " |")
                lines.append("")
    if report["timing"]:
        lines += ["## Simulator speed", "", "| policy | requests | models | seconds |",
                  "|---|---:|---:|---:|"]
        for t in report["timing"]:
            lines.append(f"| {t['policy']} | {t['requests']:,} | {t['models']} | "
                         f"{t['simulate_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = report["meta"], report["results"]
    written = []
    for pm in report["populations"]:
        pop = pm["population"]
        kinds = meta["kinds"]
        fig, axes = plt.subplots(2, len(kinds), figsize=(4.5 * len(kinds), 7), squeeze=False,
                                 sharex=True)
        for j, kind in enumerate(kinds):
            at = [r for r in rows if r["population"] == pop and r["kind"] == kind]
            for p in [p for p in meta["policies"] if not policy_class(p).ablation] + ["bound"]:
                pts = sorted((r["budget_fraction"], r["miss_rate"] + r["stall_rate"],
                              r["effective_accuracy"]) for r in at if r["policy"] == p)
                x = [100 * a for a, _, _ in pts]
                style = ({"linewidth": 2.5, "color": "black"} if p == "memadapt" else
                         {"linestyle": ":", "color": "red"} if p == "bound" else
                         {"linestyle": "--"} if p == "belady" else {})
                axes[0][j].plot(x, [max(b, 1e-5) for _, b, _ in pts], marker="o", ms=3,
                                label=p, **style)
                if p != "bound":
                    axes[1][j].plot(x, [c for _, _, c in pts], marker="o", ms=3, label=p,
                                    **style)
            axes[0][j].set_title(f"{pop} / {kind}")
            axes[0][j].set_yscale("log")
            axes[0][j].set_ylabel("miss + stall rate (log)")
            axes[1][j].set_ylabel("effective accuracy")
            axes[1][j].set_xlabel("budget (% of all base variants)")
            for ax in (axes[0][j], axes[1][j]):
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"policies-{pop}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--populations", default=",".join(POPULATIONS),
                    help=f"comma list of {', '.join(POPULATIONS)}")
    ap.add_argument("--profiles", action="append", default=[],
                    help="a profiles JSON file to add as a population (repeat)")
    ap.add_argument("--models", type=int, default=60)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--kinds", default="zipf,azure,bursty,diurnal")
    ap.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    ap.add_argument("--policies", default="", help="comma list; default all registered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-requests", type=int, default=1_000_000,
                    help="requests for the simulator speed check (0 skips it)")
    ap.add_argument("--quick", action="store_true",
                    help="demo population, zipf and azure, five budgets, 50k requests")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.populations, args.kinds, args.requests = "demo", "zipf,azure", 50_000
        args.fractions, args.timing_requests = "0.1,0.3,0.5,0.7,1.0", 0
    args.kinds = args.kinds.split(",")
    args.fractions = [float(x) for x in args.fractions.split(",")]
    policies = args.policies.split(",") if args.policies else list_policies()
    pops: dict[str, tuple[list[ModelDemand], str]] = {}
    for name in [p for p in args.populations.split(",") if p]:
        if name not in POPULATIONS:
            ap.error(f"unknown population {name!r}; known: {', '.join(POPULATIONS)}")
        doc = json.loads(POPULATIONS[name].read_text())
        pops[name] = (demands_from_json(POPULATIONS[name]), doc.get("source", ""))
    for f in args.profiles:
        pops[Path(f).stem] = (demands_from_json(f), f"file {f}")

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    metas = []
    for name, (fams, _src) in pops.items():
        r, m = run_population(name, fams, args, policies)
        rows += r
        metas.append(m)
    sweep_s = time.perf_counter() - t0

    timing = []
    if args.timing_requests:
        fams = next(iter(pops.values()))[0]
        population = clone_population(fams, args.models, seed=args.seed)
        tr = synth("zipf", [d.model for d in population], args.timing_requests, seed=args.seed,
                   duration_s=args.duration)
        for name in ("lru", "infaas", "memadapt"):
            t1 = time.perf_counter()
            res = compare(tr, population, [name], int(0.3 * full_bytes(population)))
            timing.append({"policy": name, "requests": args.timing_requests,
                           "models": len(population), "simulate_s": time.perf_counter() - t1,
                           "replay_loop_s": res[name].wall_s})
            log.info("1M timing %s: %.2fs", name, timing[-1]["simulate_s"])

    report = {
        "meta": {"benchmark": "policies",
                 "command": " ".join(["python", "benchmarks/policies.py", *sys.argv[1:]]),
                 "requests": args.requests,
                 "duration_s": args.duration, "models": args.models, "seed": args.seed,
                 "kinds": args.kinds, "fractions": args.fractions, "policies": policies,
                 "sources": {k: v[1] for k, v in pops.items()}, "sweep_s": sweep_s,
                 "python": platform.python_version(), "numpy": np.__version__,
                 "machine": platform.machine(), "cpus": os.cpu_count()},
        "populations": metas, "results": rows, "timing": timing, "summary": summary(rows),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policies.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    md = markdown(report)
    (out / "policies.md").write_text(md)
    for old in out.glob("policies-*.png"):
        old.unlink()
    plot(report, out)
    print(md.split("## Population")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
