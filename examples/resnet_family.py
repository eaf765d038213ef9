"""The ResNet family end to end: train, generate variants with recovery, profile, plan.

    python examples/resnet_family.py                # ResNet-18 and ResNet-34, a few minutes
    python examples/resnet_family.py --smoke        # tiny and fast (CI)
    python examples/resnet_family.py --pretrained   # torchvision weights (needs network)

1. trains each model briefly on the built-in digits task (10 classes, 32x32), or
   loads torchvision's pretrained ImageNet weights with --pretrained / a file with --weights;
2. generates prune / int8 / early-exit variants and their combinations, recovered by
   distillation from the base;
3. profiles them (memory per batch size, latency, load time, accuracy) into the catalog;
4. prints the catalog table, chooses plans for three budgets, and saves the Pareto plot.
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
from variants.train import train

console = Console(width=150)


def build(args) -> Path:
    store = Path(args.store)
    for model in args.models:
        weights = args.weights
        if not args.pretrained and weights is None:
            weights = store / f"{model}-digits.safetensors"
            if not weights.exists():
                fam = variants.family_of(model)
                built = fam.build(model, num_classes=10)
                res = train(built.module, fam, built.arch, epochs=args.epochs, out=weights)
                console.print(f"trained {model} on digits for {args.epochs} epochs: held-out "
                              f"accuracy {res.eval_accuracy:.3f}")
        res = variants.generate(
            model, store, num_classes=None if args.pretrained else 10, weights=weights and
            str(weights), pretrained=args.pretrained, prune=args.prune, exits=args.exits,
            quantize=["int8"], combine=args.combine, recover_steps=args.recover_steps,
            calib="digits", resolution=args.resolution)
        console.print(f"{model}: " + ", ".join(f"{r.name} ({r.status}, {r.seconds:.0f}s)"
                                               for r in res))
    return store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="resnet-store")
    ap.add_argument("--smoke", action="store_true", help="tiny and fast, for CI")
    ap.add_argument("--pretrained", action="store_true", help="torchvision weights (network)")
    ap.add_argument("--weights", default=None, help="a local state dict for every model")
    ap.add_argument("--plot", default=None, help="Pareto plot path (default STORE/pareto.png)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        args.models, args.epochs, args.prune, args.exits = ["resnet10"], 1, [0.5], [2]
        args.combine, args.recover_steps, args.resolution = False, 10, 64
        batches, runs = (1, 4), 5
    else:
        args.models, args.epochs, args.prune, args.exits = ["resnet18", "resnet34"], 3, [0.5], \
            [2, 3]
        args.combine, args.recover_steps, args.resolution = True, None, 224
        batches, runs = (1, 8), 20
    store = build(args)
    profiler.profile(store, batches=batches, runs=runs)
    profiles = profiler.load_profiles(store)
    console.print(report.table(profiles, title="catalog (★ Pareto-optimal)"))
    plot = Path(args.plot or store / "pareto.png")
    report.plot(profiles, plot)

    batch = max(batches)
    demands = demands_from_catalog(variants.Store(store), batch=batch)
    # floors: 95% of each base's accuracy
    demands = [ModelDemand(d.model, d.candidates, floor=0.95 * max(
        c.accuracy for c in d.candidates if c.variant == d.model), rate=d.rate)
        for d in demands]
    console.print(plans_table(demands, (1.0, 0.5, 0.3), f"plans (memory charged at batch "
                                                        f"{batch}; floors 95% of base accuracy)"))
    console.print(f"Pareto plot: {plot}; store: {store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
