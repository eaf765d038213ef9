"""Benchmark of the profiler on a 10-variant ResNet-18 family (10 classes, served at 224x224).

1. Generate the family into a store (idempotent: a second run reuses it): base (trained
   one epoch on digits so that accuracy means something), int8, fp16, and, where their
   transforms are registered, prune 0.3 / 0.5 / 0.5+int8 and exit 1 / 2 / 2+int8 / 3;
   recovery is shortened (``--recover-steps``), so the pruned/exit accuracies are those of
   briefly recovered variants, not the best the toolkit can reach.
2. Profile every variant at batch 1 and 8 from an empty catalog (``runs`` timed runs after
   ``warmup``, accuracy on the digits eval split) and record how long it took.
3. Repeatability: the base and int8 at batch 1 and 8 measured again (fresh processes)
   twice, relative spread of the peaks.
4. Fit: each variant's memory line from batches 1 and 8 predicts batch 4, which is then
   measured directly; relative error.
5. Cross-check: the profiler's process peak at batch 1 against ``/usr/bin/time -v`` of a
   separate python that only loads the ONNX file with onnxruntime and runs it, minus the
   max RSS of the same imports alone (same allocator setting).
6. The allocator: base at batch 1 and 8 measured three times with glibc unpinned
   (``allocator="default"``), in a copy of the store, to show what pinning removes.

Results go to ``results/profile.json`` and ``results/profile.md``.

Run:  nice python benchmarks/profile_bench.py      (about 10 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import profiler  # noqa: E402
import variants  # noqa: E402
from profiler import report  # noqa: E402
from profiler.memory import independent_peak  # noqa: E402
from variants import EarlyExit, Prune, Quantize, Store  # noqa: E402

log = logging.getLogger("benchmarks.profile")

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def chains() -> list[tuple]:
    have = set(variants.list_transforms())
    out: list[tuple] = [(), (Quantize("int8"),), (Quantize("fp16"),)]
    if "prune" in have:
        out += [(Prune(0.3),), (Prune(0.5),), (Prune(0.3), Quantize("int8")),
                (Prune(0.5), Quantize("int8"))]
    if "exit" in have:
        out += [(EarlyExit(1),), (EarlyExit(2),), (EarlyExit(3),),
                (EarlyExit(2), Quantize("int8"))]
    return out


def build_store(root: Path, recover_steps: int) -> tuple[Store, float, list[dict]]:
    import torch

    from variants.families import get_family
    from variants.train import train

    t0 = time.perf_counter()
    weights = root / "resnet18-digits.safetensors"
    root.mkdir(parents=True, exist_ok=True)
    if not weights.exists():
        torch.manual_seed(0)
        fam = get_family("resnet")
        built = fam.build("resnet18", num_classes=10)
        r = train(built.module, fam, built.arch, epochs=1, out=weights)
        log.info("base trained on digits: eval accuracy %.3f", r.eval_accuracy)
    failed = []
    for chain in chains():  # one by one, so that a transform that fails costs only itself
        try:
            variants.generate("resnet18", root / "store", chains=[chain], num_classes=10,
                              weights=str(weights), recover_steps=recover_steps)
        except Exception as e:  # noqa: BLE001 - recorded in the results, the rest goes on
            name = variants.variant_name("resnet18", chain)
            log.error("generating %s failed: %s", name, e)
            failed.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:400]})
    return Store(root / "store"), time.perf_counter() - t0, failed


def cross_check(store: Store, name: str) -> dict:
    prof = {p.name: p for p in profiler.load_profiles(store)}[name].batch(1)
    from variants.ort_forms import optimized_graph

    # the profiler measures the backend's load path: the graph optimised once, opened as is
    independent = independent_peak(str(optimized_graph(store.get(name)).graph_path),
                                   optimized=True)
    return {"variant": name, "batch": 1, "profiler_process_peak_bytes": prof.process_peak_bytes,
            "time_v_bytes": independent,
            "rel_diff": abs(prof.process_peak_bytes - independent) / independent}


def _peak(store: Store, name: str, batch: int) -> int:
    return {p.name: p for p in profiler.load_profiles(store)}[name].batch(batch) \
        .peak_memory_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "memadapt-profile-bench"),
                    help="folder for the store (reused by later runs)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--recover-steps", type=int, default=40)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    store, gen_s, gen_failed = build_store(Path(args.work), args.recover_steps)
    names = store.names()
    for f in store.root.glob("catalog.sqlite*"):
        f.unlink()
    log.info("profiling %d variants: %s", len(names), ", ".join(names))
    t0 = time.perf_counter()
    results = profiler.profile(store, batches=(1, 8), runs=args.runs, warmup=args.warmup)
    profile_s = time.perf_counter() - t0
    per_variant: dict[str, float] = {}
    for r in results:
        per_variant[r.variant] = per_variant.get(r.variant, 0.0) + r.seconds
    failed = [r for r in results if r.status != "ok"]
    profiles = profiler.load_profiles(store)
    rows = report.rows(profiles)
    fits = {p.name: p.predict_memory(4) for p in profiles}

    # 3. repeatability: two more fresh measurements of the same variants
    repeat = []
    for name in [n for n in ("resnet18", "resnet18+int8") if n in names]:
        for b in (1, 8):
            peaks = [_peak(store, name, b)]
            for _ in range(2):
                profiler.profile(store, variants=[name], batches=(b,), runs=3, warmup=1,
                                 eval="none", force=True)
                peaks.append(_peak(store, name, b))
            repeat.append({"variant": name, "batch": b, "peaks_bytes": peaks,
                           "rel_spread": (max(peaks) - min(peaks)) / max(peaks)})

    # 4. fit: predicted (from 1 and 8) vs measured at batch 4
    profiler.profile(store, batches=(4,), runs=3, warmup=1, eval="none")
    fit = []
    for p in profiler.load_profiles(store):
        b4 = p.batch(4)
        if b4 is None or not b4.ok or fits.get(p.name) is None:
            continue
        m = b4.peak_memory_bytes
        fit.append({"variant": p.name, "predicted_bytes": fits[p.name], "measured_bytes": m,
                    "rel_error": abs(fits[p.name] - m) / m})

    # 5. independent cross-check
    checks = [cross_check(store, n) for n in ("resnet18", "resnet18+int8") if n in names] \
        if Path("/usr/bin/time").exists() else []

    # 6. unpinned allocator, in a copy so the main catalog stays pinned
    unpinned = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        (copy / "variants").mkdir(parents=True)
        shutil.copytree(store.variant_dir("resnet18"), copy / "variants" / "resnet18",
                        copy_function=os.link)
        for b in (1, 8):
            peaks, statics = [], []
            for _ in range(3):
                profiler.profile(copy, batches=(b,), runs=3, warmup=1, eval="none",
                                 force=True, allocator="default")
                bp = profiler.load_profiles(copy)[0].batch(b)
                peaks.append(bp.peak_memory_bytes)
                statics.append(bp.static_memory_bytes)
            unpinned.append({"variant": "resnet18", "batch": b, "peaks_bytes": peaks,
                             "static_bytes": statics,
                             "pinned_peak_bytes": _peak(store, "resnet18", b)})

    out = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": len(os.sched_getaffinity(0)),
                    "device": profiler.device_info("cpu").to_dict()},
        "settings": {"batches": [1, 8], "runs": args.runs, "warmup": args.warmup,
                     "recover_steps": args.recover_steps, "resolution": 224,
                     "allocator": "pinned"},
        "variants": names, "generate_s": gen_s, "generate_failed": gen_failed,
        "profile_s": profile_s,
        "profile_s_per_variant": per_variant,
        "failed": [{"variant": r.variant, "batch": r.batch, "kind": r.kind, "status": r.status,
                    "error": r.error} for r in failed],
        "rows": rows, "repeatability": repeat, "fit": fit, "cross_check": checks,
        "unpinned_allocator": unpinned,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (RESULTS / "profile.md").write_text(markdown(out))
    log.info("wrote %s and %s", RESULTS / "profile.json", RESULTS / "profile.md")
    return 0


def _mib(v) -> str:
    return "-" if v is None else f"{v / MiB:.1f}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(o: dict) -> str:
    lines = [
        "# Profiler benchmark: ResNet-18 family (10 classes, 224x224, CPU)", "",
        f"Machine: {o['machine']['device']['cpu']}, {o['machine']['cpus']} CPUs shared with "
        f"other work (timings are noisy), {o['machine']['platform']}.", "",
        f"- {len(o['variants'])} variants generated in {o['generate_s']:.0f} s "
        f"(including one epoch of training on digits, recovery {o['settings']['recover_steps']} "
        f"steps; a second run reuses the store, so this is then only the checks).",
        *[f"- Generation failed for {g['variant']}: `{g['error'][:200]}`"
          for g in o["generate_failed"]],
        f"- **Profiling all of them at batch 1 and 8 ({o['settings']['runs']} timed runs after "
        f"{o['settings']['warmup']} warm-up, accuracy on 400 digits): {o['profile_s']:.0f} s** "
        f"({o['profile_s'] / len(o['variants']):.1f} s per variant; "
        f"{len(o['failed'])} failed measurements recorded).",
        *[f"- {f['variant']} {f['kind']}"
          f"{'' if f['batch'] is None else ' batch ' + str(f['batch'])}: {f['status']}: "
          f"`{(f['error'] or '')[:160]}`" for f in o["failed"]],
        "",
        "| variant | batch | peak MiB | static MiB | load peak MiB | p50 ms | p95 ms | "
        "cold load ms | warm load ms | accuracy | fidelity | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in o["rows"]:
        lines.append(
            f"| {r['name']} | {r['batch']} | {_mib(r['peak_memory_bytes'])} | "
            f"{_mib(r['static_memory_bytes'])} | {_mib(r['load_peak_bytes'])} | "
            f"{(r['latency_p50_s'] or 0) * 1e3:.1f} | {(r['latency_p95_s'] or 0) * 1e3:.1f} | "
            f"{(r['load_cold_s'] or 0) * 1e3:.0f} | {(r['load_warm_s'] or 0) * 1e3:.0f} | "
            f"{_num(r['accuracy'])} | {_num(r['fidelity'])} | "
            f"{'★' if r['pareto'] else ''} |")
    lines += ["", "## Repeatability (fresh process each time)", "",
              "| variant | batch | peaks MiB | spread |", "|---|---:|---|---:|"]
    for r in o["repeatability"]:
        lines.append(f"| {r['variant']} | {r['batch']} | "
                     f"{', '.join(_mib(p) for p in r['peaks_bytes'])} | "
                     f"{r['rel_spread'] * 100:.2f}% |")
    lines += ["", "## Memory fit: batch 4 predicted from batches 1 and 8, then measured", "",
              "| variant | predicted MiB | measured MiB | error |", "|---|---:|---:|---:|"]
    for r in o["fit"]:
        lines.append(f"| {r['variant']} | {_mib(r['predicted_bytes'])} | "
                     f"{_mib(r['measured_bytes'])} | {r['rel_error'] * 100:.1f}% |")
    if o["fit"]:
        lines.append(f"\nLargest error: {max(r['rel_error'] for r in o['fit']) * 100:.1f}%.")
    lines += ["", "## Independent cross-check (`/usr/bin/time -v`, batch 1)", "",
              "| variant | profiler process peak MiB | /usr/bin/time MiB | difference |",
              "|---|---:|---:|---:|"]
    for r in o["cross_check"]:
        lines.append(f"| {r['variant']} | {_mib(r['profiler_process_peak_bytes'])} | "
                     f"{_mib(r['time_v_bytes'])} | {r['rel_diff'] * 100:.1f}% |")
    lines += ["", "## Why the allocator is pinned", "",
              "glibc moves its mmap threshold up whenever a large block is freed, so memory "
              "onnxruntime freed while building the session stays resident, by an amount that "
              "depends on thread timing. Base variant, three fresh processes each, unpinned "
              "(`allocator=\"default\"`) vs pinned (`MALLOC_MMAP_THRESHOLD_=131072`):", "",
              "| batch | unpinned peaks MiB | unpinned static MiB | pinned peak MiB |",
              "|---:|---|---|---:|"]
    for r in o["unpinned_allocator"]:
        lines.append(f"| {r['batch']} | {', '.join(_mib(p) for p in r['peaks_bytes'])} | "
                     f"{', '.join(_mib(p) for p in r['static_bytes'])} | "
                     f"{_mib(r['pinned_peak_bytes'])} |")
    lines += ["", "Run: `nice python benchmarks/profile_bench.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
