"""Swap speed: how fast a variant comes back, side by side with a memcpy of its bytes.

    flock /tmp/memadapt-heavy.lock nice .venv/bin/python benchmarks/swaps.py [--quick] [--out DIR]

For ResNet-18, ResNet-50 (224x224, 1000 classes) and MiniLM (128 tokens), generated into a
temporary store with ``variants.generate``, on the CPU with one intra-op thread; every load
timed from its start to the end of the first batch-1 run, minus one steady run timed right
after it (the median of three runs; so a load is what a swap adds to the request that
waits for it). In each repeat,
in turn:

- ``memcpy``: ``numpy.copyto`` of the variant's ONNX bytes into a preallocated buffer, the
  floor of bringing it back from host memory;
- ``bare_file``: today's way, ``variants.backends.open_onnx`` on ``model.onnx`` (onnxruntime
  parses and optimises the graph on every open);
- ``optimized_file``: the onnxruntime backend from the graph optimised once for this device
  (``variants.ort_forms.optimized_graph``), opened with graph optimisation off;
- ``host_reload``: the onnxruntime backend from its host form (``variants.backends.host_form``:
  the optimised graph's bytes and its tensors as arrays the session computes on in place);
- ``torch_reload``: the torch backend from its host form (state-dict tensors filling a
  skeleton built with empty parameters); ``torch_file``: the torch backend from safetensors.

Then a downgrade ResNet-50 -> exit@k through onnxruntime with shared tensors: the full model
loaded through a ``TensorPool``, the exit variant opened from the pool plus its head (the
tensors the pool does not hold, ``ort_host_form(exclude=...)``), counting the bytes the
process read meanwhile (``/proc/self/io`` ``rchar``). Median and min of the repeats.

Results: ``results/swaps.json`` and ``results/swaps.md`` (``--out DIR`` writes them there).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import variants  # noqa: E402
from variants.backends import get_backend, host_form, open_onnx  # noqa: E402
from variants.families import get_family  # noqa: E402
from variants.ort_forms import optimized_graph, ort_host_form, ort_tensor_index  # noqa: E402
from variants.shared import TensorPool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 1
MODELS = ("resnet18", "resnet50", "minilm")
MODES = ("memcpy", "bare_file", "optimized_file", "host_reload", "torch_reload", "torch_file")
MB = 1e6


def _inputs(manifest) -> dict[str, np.ndarray]:
    fam = get_family(manifest.family)
    ts = fam.example_inputs(manifest.arch, 1, seed=0)
    return {i["name"]: t.numpy() for i, t in zip(manifest.inputs, ts)}


def timed_load(make, x, steady_runs: int = 3) -> tuple[float, float]:
    """(load to the end of the first run minus a steady run, the steady run) in seconds; the
    steady run is the median of ``steady_runs`` right after (one alone is at the mercy of a
    neighbour's burst on a shared machine)."""
    gc.collect()
    t0 = time.perf_counter()
    s = make()
    s.run(x)
    t1 = time.perf_counter()
    runs = []
    for _ in range(steady_runs):
        t = time.perf_counter()
        s.run(x)
        runs.append(time.perf_counter() - t)
    s.close()
    del s
    gc.collect()
    run = statistics.median(runs)
    return (t1 - t0) - run, run


def _memcpy(nbytes: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # (pages of dst touched once, as a preallocated buffer's would be)
    t = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t


def _stats(v: list[float]) -> tuple[float, float]:
    return statistics.median(v), min(v)


def loads(store: variants.Store, name: str, repeats: int) -> dict:
    """One row: every way of bringing ``name`` back, in turn, ``repeats`` times."""
    m = store.get(name)
    x = _inputs(m)
    ort_f, torch_f = get_backend("onnxruntime"), get_backend("torch")
    t = time.perf_counter()
    graph = optimized_graph(m, "cpu")  # made once per device (kept in the store)
    optimize_s = time.perf_counter() - t
    ort_form = host_form(m, "onnxruntime", "cpu")
    torch_form = host_form(m, "torch", "cpu")
    makers = {
        "bare_file": lambda: open_onnx(m.onnx_path, threads=THREADS, variant=name),
        "optimized_file": lambda: ort_f(m, threads=THREADS),
        "host_reload": lambda: ort_f(m, threads=THREADS, source=ort_form),
        "torch_reload": lambda: torch_f(m, threads=THREADS, source=torch_form),
        "torch_file": lambda: torch_f(m, threads=THREADS),
    }
    for make in makers.values():  # warm-up: page cache, lazy imports, allocator
        timed_load(make, x)
    out: dict[str, list[float]] = {k: [] for k in MODES}
    steady: list[float] = []
    ref = open_onnx(m.onnx_path, threads=THREADS).run(x)
    for _ in range(repeats):
        out["memcpy"].append(_memcpy(m.bytes))
        for k, make in makers.items():
            load, run = timed_load(make, x)
            out[k].append(load)
            if k == "host_reload":
                steady.append(run)
    s = ort_f(m, threads=THREADS, source=ort_form)
    err = float(np.abs(s.run(x) - ref).max())
    s.close()
    row = {"model": m.base, "variant": name, "bytes": m.bytes,
           "host_form_bytes": ort_form.nbytes, "torch_host_form_bytes": torch_form.nbytes,
           "optimized_tensor_bytes": graph.nbytes, "optimize_once_s": round(optimize_s, 4),
           "steady_run_s": statistics.median(steady), "repeats": repeats,
           "host_reload_max_abs_diff": err}
    for k, v in out.items():
        med, lo = _stats(v)
        row[f"{k}_s"], row[f"{k}_min_s"] = med, lo
    return row


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("rchar"))


def downgrades(store: variants.Store, full: str, exits: list[str], repeats: int) -> list[dict]:
    """Full -> exit@k through onnxruntime sessions sharing one TensorPool."""
    ort_f = get_backend("onnxruntime")
    mf = store.get(full)
    x = _inputs(mf)
    full_form = host_form(mf, "onnxruntime", "cpu")
    rows = []
    for name in exits:
        me = store.get(name)
        index = ort_tensor_index(me, "cpu")
        full_keys = set(ort_tensor_index(mf, "cpu").values())
        opens, firsts, steadies, reads, freed, heads = [], [], [], [], [], []
        for i in range(repeats + 1):
            pool = TensorPool("cpu")
            resident = ort_f(mf, threads=THREADS, pool=pool, source=full_form)
            resident.run(x)
            head = ort_host_form(me, "cpu", exclude=pool.held(index.values()))
            gc.collect()
            r0 = _rchar()
            t0 = time.perf_counter()
            small = ort_f(me, threads=THREADS, pool=pool, source=head)
            t1 = time.perf_counter()
            small.run(x)
            t2 = time.perf_counter()
            r1 = _rchar()
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                small.run(x)
                runs.append(time.perf_counter() - t)
            before = pool.bytes()
            resident.close()  # break: the tail no other session holds leaves the pool
            if i:  # (the first is a warm-up)
                opens.append(t1 - t0)
                firsts.append((t2 - t0) - statistics.median(runs))
                steadies.append(statistics.median(runs))
                reads.append(r1 - r0)
                freed.append(before - pool.bytes())
                heads.append(head.nbytes)
            small.close()
        rows.append({"full": full, "variant": name, "exit": me.arch.get("exit", {}).get("at"),
                     "open_s": statistics.median(opens), "open_min_s": min(opens),
                     "open_first_run_s": statistics.median(firsts),
                     "open_first_run_min_s": min(firsts),
                     "steady_run_s": statistics.median(steadies), "bytes_read": max(reads),
                     "shared_bytes": sum(k.nbytes for k in set(index.values()) & full_keys),
                     "head_bytes": heads[0], "freed_bytes": freed[0], "repeats": repeats})
    return rows


def checks(rows: list[dict], downs: list[dict]) -> dict:
    r50 = next((r for r in rows if r["model"] == "resnet50"), None)
    out: dict = {}
    if r50 is not None:
        disk = min(r50["bare_file_s"], r50["optimized_file_s"])
        out["resnet50_host_reload_over_memcpy"] = r50["host_reload_s"] / r50["memcpy_s"]
        out["resnet50_host_reload_at_most_3x_memcpy"] = \
            r50["host_reload_s"] <= 3 * r50["memcpy_s"]
        out["resnet50_host_reload_faster_than_disk"] = r50["host_reload_s"] < disk
    if downs:
        out["resnet50_downgrade_open_under_5ms"] = all(d["open_s"] < 5e-3 for d in downs)
        out["resnet50_downgrade_with_first_run_under_5ms"] = \
            all(d["open_first_run_s"] < 5e-3 for d in downs)
        out["resnet50_downgrade_reads_nothing"] = all(d["bytes_read"] < 64 * 1024 for d in downs)
    return out


def build(store: variants.Store, quick: bool) -> tuple[str, list[str]]:
    exits = [3] if quick else [2, 3]
    variants.generate("resnet18", store)
    # exit heads untrained (recover_steps=0): a load's time does not depend on their values
    variants.generate("resnet50", store, exits=exits, recover_steps=0)
    variants.generate("minilm", store)
    return "resnet50", [f"resnet50+exit{k}" for k in exits]


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "swaps.json").write_text(json.dumps(result, indent=2) + "\n")
    meta = result["meta"]
    ms = 1e3
    lines = ["# Swaps: bringing a variant back", "",
             f"Command: `{meta['command']}`  ",
             f"Python {meta['python']}, onnxruntime {meta['onnxruntime']}, torch "
             f"{meta['torch']}, {meta['cpus']} CPUs, {THREADS} intra-op thread. "
             f"{meta['repeats']} repeats of each, in turn within one run; median (min) ms. "
             "A load is timed from its start to the end of the first batch-1 run, minus a "
             "steady run of the same session (median of three after it).", "",
             "| model | ONNX MB | memcpy | bare ORT from file | optimised graph from file | "
             "ORT host re-load | torch host re-load | torch from file | steady run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cells = [f"{ms * r[f'{k}_s']:.1f} ({ms * r[f'{k}_min_s']:.1f})" for k in MODES]
        lines.append(f"| {r['variant']} | {r['bytes'] / MB:.1f} | " + " | ".join(cells)
                     + f" | {ms * r['steady_run_s']:.1f} |")
    lines += ["", "Optimising a graph once (kept in the store per device, execution provider "
              "and onnxruntime version): " + ", ".join(
                  f"{r['variant']} {r['optimize_once_s']:.2f} s" for r in result["rows"]) + ".",
              "The host re-load's session computes on the host form's arrays (no copy), so "
              "its cost is the session's set-up; on CUDA the arrays are copied to the device "
              "by onnxruntime."]
    if result["downgrades"]:
        lines += ["", "## Downgrade full -> exit@k through onnxruntime with shared tensors", "",
                  "The full model resident through a `TensorPool`; the exit variant opened "
                  "from the pool (its prefix) and its head in memory. 'bytes read' is what the "
                  "process read from any file meanwhile (`/proc/self/io`). Sessions over an "
                  "optimised graph open without onnxruntime's buffer-reuse pass "
                  "(`variants.backends.CPU_MEM_REUSE`; the memory pattern lays the run's "
                  "buffers out by lifetime anyway) and from a graph stored without its "
                  "intermediate shapes, which onnxruntime infers again.", "",
                  "| variant | open ms | open + first run - steady ms | steady run ms | "
                  "shared MB | head MB | freed by dropping the full MB | bytes read |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for d in result["downgrades"]:
            lines.append(f"| {d['full']} -> {d['variant']} | {ms * d['open_s']:.2f} "
                         f"({ms * d['open_min_s']:.2f}) | {ms * d['open_first_run_s']:.2f} "
                         f"({ms * d['open_first_run_min_s']:.2f}) | "
                         f"{ms * d['steady_run_s']:.1f} | "
                         f"{d['shared_bytes'] / MB:.1f} | {d['head_bytes'] / MB:.1f} | "
                         f"{d['freed_bytes'] / MB:.1f} | {d['bytes_read']} |")
    c = result["checks"]
    if c:
        lines += ["", "## Targets (issue 15)", ""]
        if "resnet50_host_reload_over_memcpy" in c:
            lines.append(f"- ResNet-50 host re-load / memcpy = "
                         f"{c['resnet50_host_reload_over_memcpy']:.2f} (target <= 3: "
                         f"{'met' if c['resnet50_host_reload_at_most_3x_memcpy'] else 'NOT met'}"
                         f"); faster than any load from disk: "
                         f"{'yes' if c['resnet50_host_reload_faster_than_disk'] else 'NO'}.")
        if "resnet50_downgrade_open_under_5ms" in c:
            met = {k: "met" if c[k] else "NOT met" for k in c}
            lines.append(f"- ResNet-50 downgrade to exit@k under 5 ms: session open "
                         f"{met['resnet50_downgrade_open_under_5ms']}, "
                         f"open + first run - steady run "
                         f"{met['resnet50_downgrade_with_first_run_under_5ms']}"
                         f"; reads no file: "
                         f"{'yes' if c['resnet50_downgrade_reads_nothing'] else 'NO'}.")
    (out / "swaps.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 repeats, one exit (under 3 min)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where swaps.json/.md go")
    ap.add_argument("--store", type=Path, default=None,
                    help="generate the variants here (re-runs reuse them) instead of a temp dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime as ort
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    repeats = 5 if args.quick else 11
    with tempfile.TemporaryDirectory(prefix="swaps.") as tmp:
        store = variants.Store(args.store or Path(tmp) / "store", create=True)
        full, exits = build(store, args.quick)
        print(f"[{time.perf_counter() - start:.0f} s] variants generated", flush=True)
        rows = []
        for name in MODELS:
            rows.append(loads(store, name, repeats))
            print(f"[{time.perf_counter() - start:.0f} s] " + ", ".join(
                f"{k} {1e3 * v:.1f} ms" for k, v in rows[-1].items()
                if k.endswith("_s") and not k.endswith("min_s")), flush=True)
        downs = downgrades(store, full, exits, repeats)
    cmd = "python benchmarks/swaps.py" + (" --quick" if args.quick else "")
    result = {"meta": {"command": cmd, "python": platform.python_version(),
                       "onnxruntime": ort.__version__, "torch": torch.__version__,
                       "cpus": os.cpu_count(), "threads": THREADS, "repeats": repeats,
                       "quick": args.quick,
                       "seconds": round(time.perf_counter() - start, 1)},
              "rows": rows, "downgrades": downs, "checks": checks(rows, downs)}
    write(result, args.out)
    print((args.out / "swaps.md").read_text())
    print(f"wrote {args.out / 'swaps.json'} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
