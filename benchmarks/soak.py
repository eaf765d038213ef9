"""Soak: 8 client threads on one VariantCache while its budget moves, for minutes.

Four served models (two ResNet-18 and two MiniLM, each backed by the store's variants of its
family through ``aliases``, so each has its own sessions and memory) take requests from 8
client threads, round-robin over models with random inputs, while a budget thread moves the
budget every 2-5 s to a random value between 30% and 120% of the four base variants' memory.
An independent thread samples the process's RSS every 10 ms. What it checks:

* no request fails other than with the documented ``InfeasibleBudget`` (a budget below a
  model's smallest variant);
* RSS never exceeds the budget in force plus the post-import baseline (RSS after imports and
  building the cache, before any session) by more than 10% of that sum;
  ``max_rss_overshoot_fraction`` is the worst ``(rss - baseline - budget) / (baseline +
  budget)`` over every sample (negative: under), reported with when it happened.

The store is generated and profiled here (``--store`` reuses one): resnet18 (+int8, exit@2)
and minilm (+int8, exit@3), untrained weights (the soak measures memory and failures, not
accuracy). ``python benchmarks/soak.py [--minutes 10] [--out DIR]`` writes
``soak.json`` to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


#: how the store is profiled: batch 1 on one thread, as the soak and the replay run it
PROFILE = {"batches": (1,), "runs": 30, "threads": 1}


def build_store(root: Path) -> None:
    import profiler
    import variants

    variants.generate("resnet18", root, exits=[2], quantize=["int8"], num_classes=10,
                      resolution=64, seed=0)
    variants.generate("minilm", root, exits=[3], quantize=["int8"], seed=0)
    profiler.profile(root, **PROFILE)


def ensure_store(root: Path) -> Path:
    """``root``, generated and profiled with :func:`build_store` unless it is a store."""
    if not (root / "variants").is_dir():
        print(f"generating and profiling the store in {root} ...", flush=True)
        build_store(root)
    return root


def reprofile(root: Path) -> None:
    """Measure the store's latencies and load times again, as :func:`build_store` did (the
    profiler's own path, accuracy kept): on a shared machine a profile taken minutes before
    is off by as much as the background load has changed since."""
    import profiler

    profiler.profile(root, **PROFILE, eval=None, force=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--store", type=Path, default=None,
                    help="a profiled store to reuse (built there when missing)")
    ap.add_argument("--policy", default="memadapt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from profiler.memory import pin_allocator

    pin_allocator()  # as the profiler measured: resident memory follows the catalog
    import numpy as np

    from adaptive.cache import VariantCache
    from adaptive.catalog import candidates_from_catalog
    from adaptive.errors import InfeasibleBudget
    from variants import Store, get_family

    tmp = tempfile.TemporaryDirectory(prefix="memadapt-soak-") if args.store is None else None
    store = Store(ensure_store(args.store or Path(tmp.name) / "store"))
    fams = candidates_from_catalog(store, batch=1)
    served = {"resnet-a": "resnet18", "resnet-b": "resnet18", "bert-a": "minilm",
              "bert-b": "minilm"}
    cands = {m: fams[b] for m, b in served.items()}
    base_bytes = sum(next(c for c in fams[b] if c.variant == b).memory_bytes
                     for b in served.values())
    inputs = {}
    for m, b in served.items():
        man = store.get(b)
        tensors = get_family(man.family).example_inputs(man.arch, 1, seed=0)
        inputs[m] = {i["name"]: t.numpy() for i, t in zip(man.inputs, tensors)}

    rng = random.Random(args.seed)
    lo, hi = int(0.3 * base_bytes), int(1.2 * base_bytes)
    cache = VariantCache(store, candidates=cands, aliases=served, budget=hi, max_batch=1,
                         threads=1, policy=args.policy, verify=False)
    baseline = rss()
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss(), cache.budget))
            time.sleep(0.01)

    counts = {"requests": 0, "failed_requests": 0, "infeasible_requests": 0}
    errors: list[str] = []
    lock = threading.Lock()
    names = list(served)

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            m = names[i % len(names)]
            i += 1
            try:
                cache.infer(m, inputs[m])
                key = "requests"
            except InfeasibleBudget:
                key = "infeasible_requests"
            except Exception as e:  # noqa: BLE001 - counted, reported
                key = "failed_requests"
                with lock:
                    if len(errors) < 10:
                        errors.append(f"{m}: {type(e).__name__}: {e}")
            with lock:
                counts[key] += 1
                if key != "requests":
                    counts["requests"] += 1

    changes: list[tuple[float, int]] = []

    def mover() -> None:
        while not stop.wait(rng.uniform(2.0, 5.0)):
            b = rng.randint(lo, hi)
            try:
                cache.set_budget(b)
                changes.append((time.monotonic() - t0, b))
            except Exception as e:  # noqa: BLE001 - a failed budget change is a failure
                with lock:
                    counts["failed_requests"] += 1
                    errors.append(f"set_budget({b}): {type(e).__name__}: {e}")

    threads = [threading.Thread(target=sampler, daemon=True),
               threading.Thread(target=mover, daemon=True)]
    threads += [threading.Thread(target=client, args=(k,), daemon=True)
                for k in range(args.clients)]
    for t in threads:
        t.start()
    deadline = t0 + 60 * args.minutes
    while time.monotonic() < deadline:
        time.sleep(min(30.0, deadline - time.monotonic()))
        print(f"  {time.monotonic() - t0:.0f} s: {counts}", flush=True)
    stop.set()
    for t in threads:
        t.join(60)
    stats = cache.stats()
    cache.close()

    arr = np.array(samples, dtype=np.float64)
    over = (arr[:, 1] - baseline - arr[:, 2]) / (baseline + arr[:, 2])
    worst = int(np.argmax(over))
    result = {
        "minutes": args.minutes, "clients": args.clients, "policy": args.policy,
        "models": served, "base_bytes": base_bytes, "budget_range_bytes": [lo, hi],
        **counts, "budget_changes": len(changes), "baseline_rss_bytes": baseline,
        "rss_samples": len(samples),
        "max_rss_overshoot_fraction": float(over[worst]),
        "max_rss_overshoot_at_s": float(arr[worst, 0]),
        "max_rss_overshoot_rss_bytes": int(arr[worst, 1]),
        "max_rss_overshoot_budget_bytes": int(arr[worst, 2]),
        "max_rss_bytes": int(arr[:, 1].max()),
        # the same excess as a share of the budget alone (stricter: the baseline is large)
        "max_rss_over_budget_fraction": float(((arr[:, 1] - baseline - arr[:, 2])
                                               / np.maximum(arr[:, 2], 1)).max()),
        "cache": {k: getattr(stats, k) for k in (
            "hits", "misses", "stalls", "failures", "cold_loads", "downgrades", "upgrades",
            "evictions")},
        "errors": errors,
        "command": "python benchmarks/soak.py --minutes " + f"{args.minutes:g}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "soak.json"
    for name, text in (("soak.json", json.dumps(result, indent=2) + "\n"),
                       ("soak.md", markdown(result))):
        tmp_path = args.out / (name + ".tmp")
        tmp_path.write_text(text)
        os.replace(tmp_path, args.out / name)
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}, indent=2))
    ok = result["failed_requests"] == 0 and result["max_rss_overshoot_fraction"] <= 0.10
    print("soak:", "PASS" if ok else "FAIL", f"-> {path}")
    return 0 if ok else 1


def markdown(result: dict) -> str:
    """``soak.json``'s figures, as the README reads them."""
    mib = 2 ** 20
    return "\n".join([
        f"# Soak: {result['clients']} clients for {result['minutes']:g} min ({result['policy']})",
        "", f"`{result['command']}`", "",
        "| figure | value |", "|---|---:|",
        f"| requests | {result['requests']:,} |",
        f"| failed requests | {result['failed_requests']} |",
        f"| InfeasibleBudget | {result['infeasible_requests']} |",
        f"| budget changes | {result['budget_changes']} |",
        f"| RSS samples (every 10 ms) | {result['rss_samples']:,} |",
        f"| post-import baseline RSS | {result['baseline_rss_bytes'] / mib:.0f} MiB |",
        f"| worst RSS over budget + baseline, of that sum | "
        f"{result['max_rss_overshoot_fraction']:+.1%} |",
        f"| ... at | {result['max_rss_overshoot_at_s']:.0f} s (RSS "
        f"{result['max_rss_overshoot_rss_bytes'] / mib:.0f} MiB, budget "
        f"{result['max_rss_overshoot_budget_bytes'] / mib:.0f} MiB) |",
        f"| worst RSS over budget + baseline, of the budget alone | "
        f"{result['max_rss_over_budget_fraction']:+.1%} |",
        f"| largest RSS | {result['max_rss_bytes'] / mib:.0f} MiB |", ""])


if __name__ == "__main__":
    raise SystemExit(main())
