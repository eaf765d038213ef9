"""Headline benchmark: miss rate of caching policies as the memory budget shrinks.

The claim under test: by downgrading resident models to smaller variants (never below their
accuracy floor) instead of evicting them, memadapt misses far less than whole-model caching
(LRU, LFU, CremeBrulee, ...) when memory is tight, at a bounded cost in served accuracy.

For each trace kind (zipf, azure) and each budget from 10% to 100% of the memory that all base
variants need together, every registered policy replays the same trace over a population of
models cloned from a few families; miss rate, latency, accuracy and floor violations go to
``results/policies.json``, a table to ``results/policies.md`` and a plot to
``results/policies.png``. It also times 1M requests for lru and memadapt.

Run:  python benchmarks/policies.py            (about a minute on 2 cores)
      python benchmarks/policies.py --profiles FILE.json   (per-family candidates, see below)

Profiles file format: ``{"families": [{"model": "resnet18", "floor": 0.6, "candidates":
[{"variant": "base", "memory_bytes": ..., "accuracy": ..., "latency_s": ..., "load_s": ...}]}]}``.
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

from adaptive.catalog import demands_from_catalog, demands_from_json  # noqa: E402
from adaptive.policies import get_policy, list_policies  # noqa: E402
from adaptive.select import Candidate, ModelDemand  # noqa: E402
from adaptive.simulate import clone_population, simulate  # noqa: E402
from adaptive.traces import synth  # noqa: E402

log = logging.getLogger("benchmarks.policies")

MB = 1_000_000

# ----------------------------------------------------------------------------------------------
# PLACEHOLDER PROFILES -- not measured by this project's profiler.
# Plausible CPU/onnxruntime numbers for batch 1 (resident memory incl. runtime arena, execution
# latency, cold load time, top-1 / task accuracy), anchored on DESIGN.md's field facts
# (ResNet-18 ORT 207 MB fp32 vs 99 MB int8; ResNet-50 41 ms per run, 170 ms to load) and
# published accuracies. Replace with the catalog (`--store`, via demands_from_catalog) or a
# `--profiles` file once the profiler has measured the real variants.
# ----------------------------------------------------------------------------------------------
PLACEHOLDER_FAMILIES: list[dict[str, Any]] = [
    {"model": "resnet18", "floor": 0.60, "candidates": [
        # variant,            memory,   accuracy, latency_s, load_s
        ("base",              207 * MB, 0.698, 0.018, 0.070),
        ("int8",               99 * MB, 0.692, 0.010, 0.045),
        ("prune0.5",           90 * MB, 0.620, 0.008, 0.035),
        ("prune0.5+int8",      60 * MB, 0.610, 0.006, 0.030),
        ("exit2",              60 * MB, 0.500, 0.007, 0.020),  # below the floor
        ("exit2+int8",         45 * MB, 0.490, 0.005, 0.018),  # below the floor
    ]},
    {"model": "resnet50", "floor": 0.70, "candidates": [
        ("base",              330 * MB, 0.761, 0.041, 0.170),
        ("int8",              140 * MB, 0.755, 0.020, 0.090),
        ("prune0.5",          150 * MB, 0.720, 0.016, 0.080),
        ("prune0.5+int8",      90 * MB, 0.715, 0.010, 0.060),
        ("exit3",             180 * MB, 0.660, 0.030, 0.090),  # below the floor
        ("exit3+int8",         95 * MB, 0.650, 0.016, 0.055),  # below the floor
    ]},
    {"model": "minilm", "floor": 0.78, "candidates": [
        ("base",              180 * MB, 0.850, 0.012, 0.250),
        ("int8",               75 * MB, 0.845, 0.006, 0.120),
        ("prune0.5",          120 * MB, 0.810, 0.008, 0.150),
        ("exit3",             130 * MB, 0.790, 0.006, 0.170),
        ("exit3+int8",         55 * MB, 0.780, 0.004, 0.090),
        ("prune0.5+int8",      50 * MB, 0.770, 0.004, 0.080),  # below the floor
    ]},
]

#: whole-model policies that do not see the future: the baselines of the headline claim
HEADLINE_FRACTION = 0.5
HEADLINE_FACTOR = 0.5


def placeholder_families() -> list[ModelDemand]:
    """The built-in placeholder table as ModelDemands (see the comment above it)."""
    return [ModelDemand(f["model"], [Candidate(*c) for c in f["candidates"]],
                        floor=f["floor"]) for f in PLACEHOLDER_FAMILIES]


def catalog_families(store: str, batch: int, relative_floor: float) -> list[ModelDemand]:
    """Measured families from a profiled store; each model's floor is ``relative_floor``
    times its base variant's quality (labelled accuracy, else fidelity)."""
    from dataclasses import replace

    from variants import Store

    fams = demands_from_catalog(Store(store), batch=batch)
    out = []
    for d in fams:
        base = next((c for c in d.candidates if c.variant == d.model), None)
        top = base.accuracy if base else max(c.accuracy for c in d.candidates)
        out.append(replace(d, floor=round(relative_floor * top, 4)))
    return out


def base_bytes(demands: list[ModelDemand] | tuple[ModelDemand, ...]) -> int:
    """Memory of every model's base variant together (the 100% budget); for a model without
    one, its most accurate eligible variant. (Not the most accurate everywhere: a recovered
    variant can edge past its base on a small eval set, and the reference would then
    shrink with that noise.)"""
    total = 0
    for d in demands:
        base = next((c for c in d.candidates if "+" not in c.variant), None)  # clones too
        total += (base or max(d.eligible(), key=lambda c: (c.accuracy, -c.memory_bytes))
                  ).memory_bytes
    return total


def smallest_bytes(demands: list[ModelDemand] | tuple[ModelDemand, ...]) -> int:
    """Memory of every model's smallest eligible variant, together: above this budget a
    variant-aware cache can hold every model and only compulsory misses remain."""
    return sum(min(c.memory_bytes for c in d.eligible()) for d in demands)


def _online_whole_model(policies: list[str]) -> list[str]:
    out = []
    for name in policies:
        p = get_policy(name)
        if not p.offline and not p.variant_aware:
            out.append(name)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.store:
        families = catalog_families(args.store, args.batch, args.relative_floor)
        source = (f"catalog of {args.store} (memory at batch {args.batch}; floors "
                  f"{args.relative_floor:g} x base quality)")
    elif args.profiles:
        families, source = demands_from_json(args.profiles), f"file {args.profiles}"
    else:
        families, source = placeholder_families(), "PLACEHOLDER table in benchmarks/policies.py"
    population = clone_population(families, args.models, seed=args.seed)
    names = [d.model for d in population]
    total = base_bytes(population)
    policies = args.policies.split(",") if args.policies else list_policies()
    fractions = [round(f, 3) for f in np.arange(1, 11) / 10] if not args.fractions else [
        float(x) for x in args.fractions.split(",")]
    kinds = args.kinds.split(",")

    rows: list[dict[str, Any]] = []
    compulsory: dict[str, float] = {}
    t_start = time.perf_counter()
    for kind in kinds:
        trace = synth(kind, names, args.requests, seed=args.seed, duration_s=args.duration)
        compulsory[kind] = int((trace.counts() > 0).sum()) / max(len(trace), 1)
        for frac in fractions:
            budget = int(frac * total)
            for name in policies:
                r = simulate(trace, population, name, budget, seed=args.seed)
                rows.append({
                    "kind": kind, "budget_fraction": frac, "budget_bytes": budget,
                    "policy": r.policy, "miss_rate": r.miss_rate,
                    "mean_latency_s": r.mean_latency_s, "p99_latency_s": r.p99_latency_s,
                    "load_delay_over_exec": r.load_delay_over_exec,
                    "mean_accuracy": r.mean_accuracy, "floor_violations": r.floor_violations,
                    "rejected": r.rejected, "swaps": r.swaps, "evictions": r.evictions,
                    "loads": r.loads, "wall_s": r.wall_s, **{f"stat_{k}": v for k, v in
                                                            r.policy_stats.items()},
                })
            best = min((x for x in rows if x["kind"] == kind and x["budget_fraction"] == frac),
                       key=lambda x: x["miss_rate"])
            log.info("%s %3.0f%%: best %s miss %.4f", kind, 100 * frac, best["policy"],
                     best["miss_rate"])
    sweep_s = time.perf_counter() - t_start

    timing = []
    if args.timing_requests:
        tr = synth("zipf", names, args.timing_requests, seed=args.seed, duration_s=args.duration)
        for name in ("lru", "memadapt"):
            t0 = time.perf_counter()
            r = simulate(tr, population, name, int(0.3 * total), seed=args.seed)
            timing.append({"policy": name, "requests": args.timing_requests,
                           "models": len(population), "trace": "zipf", "budget_fraction": 0.3,
                           "simulate_s": time.perf_counter() - t0, "replay_loop_s": r.wall_s,
                           "miss_rate": r.miss_rate})
            log.info("1M timing %s: %.2fs", name, timing[-1]["simulate_s"])

    return {
        "meta": {
            "benchmark": "policies", "profiles": source,
            "placeholder_profiles": not (args.store or args.profiles),
            "families": [{"model": d.model, "floor": d.floor,
                          "candidates": [c.__dict__ for c in d.candidates]} for d in families],
            "models": len(population), "requests": args.requests, "duration_s": args.duration,
            "seed": args.seed, "kinds": kinds, "fractions": fractions, "policies": policies,
            "base_bytes": total, "smallest_bytes": smallest_bytes(population),
            "compulsory_miss_rate": compulsory, "sweep_s": sweep_s,
            "python": platform.python_version(),
            "numpy": np.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "results": rows,
        "timing": timing,
        "headline": headline(rows, policies),
    }


def headline(rows: list[dict[str, Any]], policies: list[str]) -> list[dict[str, Any]]:
    """memadapt's miss rate against the best online whole-model policy at budgets <= 50%."""
    baselines = _online_whole_model(policies)
    if "memadapt" not in policies or not baselines:
        return []
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        for frac in sorted({r["budget_fraction"] for r in rows if r["kind"] == kind}):
            if frac > HEADLINE_FRACTION + 1e-9:
                continue
            at = {r["policy"]: r for r in rows
                  if r["kind"] == kind and r["budget_fraction"] == frac}
            best = min(baselines, key=lambda p: at[p]["miss_rate"])
            ours = at["memadapt"]["miss_rate"]
            base = at[best]["miss_rate"]
            out.append({"kind": kind, "budget_fraction": frac, "memadapt_miss_rate": ours,
                        "best_whole_model": best, "best_whole_model_miss_rate": base,
                        "ratio": ours / base if base > 0 else (0.0 if ours == 0 else np.inf),
                        "holds": ours <= HEADLINE_FACTOR * base})
    return out


def markdown(report: dict[str, Any]) -> str:
    meta, rows = report["meta"], report["results"]
    policies = meta["policies"]
    lines = ["# Policies: miss rate vs memory budget", ""]
    if meta["placeholder_profiles"]:
        lines += ["**Profiles are PLACEHOLDER numbers** (built-in table in "
                  "`benchmarks/policies.py`), not measured by the profiler.", ""]
    lines += [f"{meta['models']} models cloned from "
              f"{', '.join(f['model'] for f in meta['families'])}; {meta['requests']:,} "
              f"requests per trace over {meta['duration_s']:.0f} s; seed {meta['seed']}; "
              f"100% budget = {meta['base_bytes'] / 1e9:.2f} GB (all base variants). "
              f"Sweep took {meta['sweep_s']:.0f} s.", "",
              f"All smallest eligible variants together need "
              f"{meta['smallest_bytes'] / meta['base_bytes']:.1%} of that: from there on a "
              f"variant-aware cache holds every model and only compulsory (first-request) "
              f"misses remain ("
              + ", ".join(f"{k} {v:.4f}" for k, v in meta["compulsory_miss_rate"].items())
              + ").", ""]
    metrics = [("miss_rate", "Miss rate", "{:.4f}"), ("mean_accuracy", "Mean served accuracy",
                                                       "{:.4f}"),
               ("p99_latency_s", "p99 latency (ms)", "{:.0f}"),
               ("mean_latency_s", "Mean latency (ms)", "{:.1f}")]
    for kind in meta["kinds"]:
        for key, title, fmt in metrics:
            lines += [f"## {kind}: {title}", "",
                      "| budget | " + " | ".join(policies) + " |",
                      "|---:|" + "---:|" * len(policies)]
            for frac in meta["fractions"]:
                at = {r["policy"]: r for r in rows
                      if r["kind"] == kind and r["budget_fraction"] == frac}
                scale = 1000 if key.endswith("latency_s") else 1
                cells = [fmt.format(at[p][key] * scale) for p in policies]
                lines.append(f"| {frac:.0%} | " + " | ".join(cells) + " |")
            lines.append("")
    viol = sum(r["floor_violations"] for r in rows)
    lines += [f"Floor violations over all runs: {viol}.", ""]
    if report["headline"]:
        lines += ["## Headline: memadapt vs the best online whole-model policy", "",
                  f"Claim: memadapt's miss rate <= {HEADLINE_FACTOR} x the best of "
                  f"{', '.join(_online_whole_model(policies))} at every budget <= "
                  f"{HEADLINE_FRACTION:.0%}.", "",
                  "| trace | budget | memadapt | best whole-model | its miss rate | ratio "
                  "| holds |",
                  "|---|---:|---:|---|---:|---:|---|"]
        for h in report["headline"]:
            lines.append(f"| {h['kind']} | {h['budget_fraction']:.0%} | "
                         f"{h['memadapt_miss_rate']:.4f} | {h['best_whole_model']} | "
                         f"{h['best_whole_model_miss_rate']:.4f} | {h['ratio']:.3f} | "
                         f"{'yes' if h['holds'] else 'NO'} |")
        lines.append("")
    if report["timing"]:
        lines += ["## Simulator speed", "", "| policy | requests | models | seconds |",
                  "|---|---:|---:|---:|"]
        for t in report["timing"]:
            lines.append(f"| {t['policy']} | {t['requests']:,} | {t['models']} | "
                         f"{t['simulate_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = report["meta"], report["results"]
    kinds = meta["kinds"]
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 8), squeeze=False,
                             sharex=True)
    for j, kind in enumerate(kinds):
        for p in meta["policies"]:
            pts = sorted((r["budget_fraction"], r["miss_rate"], r["mean_accuracy"]) for r in rows
                         if r["kind"] == kind and r["policy"] == p)
            x = [100 * a for a, _, _ in pts]
            style = {"linewidth": 2.5, "color": "black"} if p == "memadapt" else {}
            ls = "--" if p == "belady" else "-"
            axes[0][j].plot(x, [b for _, b, _ in pts], ls, marker="o", ms=3, label=p, **style)
            axes[1][j].plot(x, [c for _, _, c in pts], ls, marker="o", ms=3, label=p, **style)
        axes[0][j].set_title(f"{kind} trace, {meta['models']} models")
        axes[0][j].set_yscale("log")  # the claim is a ratio; zeros (no misses) are not drawn
        axes[0][j].set_ylabel("miss rate (log)")
        axes[1][j].set_ylabel("mean served accuracy")
        axes[1][j].set_xlabel("budget (% of all base variants)")
        axes[0][j].grid(alpha=0.3)
        axes[1][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if meta["placeholder_profiles"]:
        fig.suptitle("placeholder profiles (not measured)", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--profiles", help="JSON file of per-family candidates")
    src.add_argument("--store", help="variant store whose catalog gives the profiles")
    ap.add_argument("--batch", type=int, default=8,
                    help="with --store: charge variants their memory at this batch size")
    ap.add_argument("--relative-floor", type=float, default=0.9,
                    help="with --store: each model's floor as a fraction of its base quality")
    ap.add_argument("--models", type=int, default=60)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--kinds", default="zipf,azure")
    ap.add_argument("--fractions", default="", help="comma list; default 0.1,0.2,...,1.0")
    ap.add_argument("--policies", default="", help="comma list; default all registered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-requests", type=int, default=1_000_000,
                    help="requests for the lru/memadapt speed check (0 skips it)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policies.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    md = markdown(report)
    (out / "policies.md").write_text(md)
    plot(report, out / "policies.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
