"""Benchmark of :class:`adaptive.VariantCache`: per-request overhead and the cost of each swap.

1. Overhead of a hit. resnet10 (10 classes, 32x32) and bert-tiny (16 tokens), batch 1, one
   intra-op thread. The same inputs go through one onnxruntime session three ways: a bare
   ``InferenceSession.run`` with a pre-built feed (the floor), memadapt's backend
   ``Session.run`` (input checks and dtype casts) and ``VariantCache.infer`` on a resident
   model. The three take turns call
   by call, each call timed alone, so machine noise falls on all of them alike; per mode the
   median time per call is reported, and the cache's overhead over the bare run (difference
   of the medians) in microseconds and percent. The cache's own work is also timed alone,
   around a session that returns its input: the figure machine noise cannot blur.
2. Swaps on a resnet18 family (base, +int8, +fp16, exported at 224x224 into a temporary
   store; each variant charged its ONNX size). Timed as the public call that does the work:
   a cold request on a fresh cache (load from disk + first run), a re-load after an eviction
   from disk and from ONNX bytes kept in host memory (``keep_host_bytes=True``; the
   ``set_budget`` that brings the budget back re-loads the model), a downgrade forced by a
   budget drop (break-before-make: the old variant cannot stay beside the new one) and an
   upgrade after a budget rise (make-before-break). For reference, a bare onnxruntime
   session from the file and from bytes. Median and min of the repeats.

Results go to ``results/cache.json`` and ``results/cache.md``.

Run:  nice python benchmarks/cache_bench.py           (about 2 minutes on 2 cores)
      python benchmarks/cache_bench.py --quick        (fewer calls and repeats)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import variants  # noqa: E402
from adaptive.cache import VariantCache  # noqa: E402
from adaptive.select import Candidate  # noqa: E402

log = logging.getLogger("benchmarks.cache")

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 1


def _bare_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _inputs(model: str):
    rng = np.random.default_rng(0)
    if model.startswith("resnet"):
        return rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(1000, 30000, (1, 16)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def overhead(store: variants.Store, model: str, calls: int, blocks: int) -> dict:
    """Median per-call time of bare ORT, memadapt's Session and a cache hit."""
    x = _inputs(model)
    # One onnxruntime session under all three modes, so the differences are pure overhead
    # and not one session's luck with memory placement against another's.
    wrapped = variants.open_session(store, model, threads=THREADS, verify=False)
    bare = wrapped._sess
    names = [i.name for i in bare.get_inputs()]
    feed = dict(zip(names, [x] if not isinstance(x, dict) else [x[n] for n in names]))
    out_names = [bare.get_outputs()[0].name]
    cache = VariantCache(store, budget=10**12, candidates={model: [Candidate(model, 1, 1.0)]},
                         verify=False, loader=lambda *a: wrapped)
    assert cache.infer(model, x).cold
    np.testing.assert_allclose(cache.infer(model, x).output, bare.run(out_names, feed)[0],
                               rtol=1e-5, atol=1e-6)
    modes = {
        "bare": lambda: bare.run(out_names, feed),
        "session": lambda: wrapped.run(x),
        "cache": lambda: cache.infer(model, x),
    }
    for fn in modes.values():  # warm-up
        for _ in range(max(10, calls // 10)):
            fn()
    # One call of each mode in turn, in rotating order, each timed alone: a neighbour's
    # burst hits single calls, which the median then ignores.
    order = list(modes.items())
    times: dict[str, list[float]] = {k: [] for k in modes}
    clock = time.perf_counter
    gc.disable()
    try:
        for i in range(calls * blocks):
            for name, fn in order[i % 3:] + order[:i % 3]:
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    finally:
        gc.enable()
    s = cache.stats()
    assert s.hits == s.requests - 1 and s.failures == 0
    cache.close()
    us = {k: 1e6 * statistics.median(v) for k, v in times.items()}
    extra = us["cache"] - us["bare"]
    return {"model": model, "calls": calls * blocks, "bare_us": us["bare"],
            "session_us": us["session"], "cache_us": us["cache"], "overhead_us": extra,
            "overhead_pct": 100.0 * extra / us["bare"],
            "session_overhead_us": us["session"] - us["bare"]}


class _NullSession:
    """A session that returns its input: what is left of ``infer`` is the cache itself."""

    def run(self, inputs):
        return inputs

    def close(self) -> None:
        pass


def machinery(store: variants.Store, model: str, calls: int, blocks: int) -> dict:
    """Per-call time of ``VariantCache.infer`` around a session that does nothing."""
    cache = VariantCache(store, budget=10**12, candidates={model: [Candidate(model, 1, 1.0)]},
                         verify=False, loader=lambda *a: _NullSession())
    x = _inputs(model)
    cache.infer(model, x)
    per_block = []
    gc.disable()
    try:
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(calls):
                cache.infer(model, x)
            per_block.append((time.perf_counter() - t0) / calls)
    finally:
        gc.enable()
    cache.close()
    return {"model": model, "calls": calls * blocks, "infer_us": 1e6 * statistics.median(per_block),
            "infer_min_us": 1e6 * min(per_block)}


def swaps(store: variants.Store, base: str, repeats: int) -> dict:
    """Seconds of each swap kind on ``base``'s family (base, +int8, +fp16)."""
    names = [base, f"{base}+fp16", f"{base}+int8"]
    size = {n: store.get(n).bytes for n in names}
    acc = {base: 0.70, f"{base}+fp16": 0.699, f"{base}+int8": 0.69}  # made up
    cands = {base: [Candidate(n, size[n], acc[n]) for n in names]}
    everything = 2 * sum(size.values())
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

    def cache(**kw) -> VariantCache:
        # memadapt-v1: its re-plan loads the base back the moment the budget allows
        return VariantCache(store, budget=kw.pop("budget", everything), candidates=cands,
                            threads=THREADS, verify=False, hysteresis=0.0,
                            policy="memadapt-v1", **kw)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    out: dict[str, list[float]] = {k: [] for k in (
        "ort_session_from_file", "ort_session_from_bytes", "cold_request_from_disk",
        "hit_request", "reload_from_disk", "reload_from_host_bytes",
        "downgrade_to_fp16", "downgrade_to_int8", "upgrade_from_int8")}
    path = store.get(base).onnx_path
    for _ in range(repeats):
        out["ort_session_from_file"].append(timed(lambda: _bare_session(path)))
        data = path.read_bytes()
        out["ort_session_from_bytes"].append(timed(lambda d=data: _bare_session_bytes(d)))

        c = cache()
        r = c.infer(base, x)
        assert r.cold and r.variant == base
        out["cold_request_from_disk"].append(r.latency_s)
        out["hit_request"].append(c.infer(base, x).latency_s)
        for target, key in ((f"{base}+fp16", "downgrade_to_fp16"),
                            (f"{base}+int8", "downgrade_to_int8")):
            c.set_budget(everything)
            c.rebalance(force=True)
            assert c.resident() == {base: base}
            out[key].append(timed(lambda c=c, t=target: c.set_budget(size[t])))
            assert c.resident() == {base: target}
        out["upgrade_from_int8"].append(timed(lambda c=c: c.set_budget(everything)))
        assert c.resident() == {base: base}
        c.set_budget(0)  # evicts: nothing fits
        out["reload_from_disk"].append(timed(lambda c=c: c.set_budget(everything)))
        assert c.resident() == {base: base}
        c.close()

        h = cache(keep_host_bytes=True, host_budget="64GiB")  # a tier of its own
        h.infer(base, x)  # reads the file into the host tier
        h.set_budget(0)
        out["reload_from_host_bytes"].append(timed(lambda h=h: h.set_budget(everything)))
        assert h.resident() == {base: base} and h.stats().host_bytes > 0
        h.close()
    return {"family": base, "bytes": size, "repeats": repeats,
            "seconds": {k: {"median": statistics.median(v), "min": min(v)}
                        for k, v in out.items()}}


def _bare_session_bytes(data: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def write(results: dict, args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "onnxruntime": ort.__version__, "threads": THREADS, "quick": args.quick}
    (RESULTS / "cache.json").write_text(json.dumps({"meta": meta, "results": results},
                                                   indent=2) + "\n")
    lines = [
        "# VariantCache: request overhead and swap times", "",
        f"Python {meta['python']} on {meta['machine']}, onnxruntime {meta['onnxruntime']}, "
        f"{THREADS} intra-op thread, CPU. Generated by `python benchmarks/cache_bench.py`"
        f"{' --quick' if args.quick else ''}.", "",
        "## Overhead of a hit over a bare `InferenceSession.run` (batch 1, median per call)",
        "",
        "| model | calls per mode | bare µs | memadapt Session µs | cache.infer µs "
        "| cache overhead µs | overhead % | of which Session wrapper µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["overhead"]:
        lines.append(f"| {r['model']} | {r['calls']} | {r['bare_us']:.1f} | "
                     f"{r['session_us']:.1f} | {r['cache_us']:.1f} | {r['overhead_us']:.1f} | "
                     f"{r['overhead_pct']:.1f} | {r['session_overhead_us']:.1f} |")
    m = results["machinery"]
    lines += [
        "", f"The cache's own work per hit, measured around a session that does nothing "
        f"({m['calls']} calls): median {m['infer_us']:.1f} µs, best block "
        f"{m['infer_min_us']:.1f} µs. Beside a real model run the same Python work costs "
        f"more (it runs with the CPU caches cold after the model), and the machine is "
        f"shared, so the differences in the table move by several µs from run to run.",
    ]
    sw = results["swaps"]
    lines += [
        "", f"## Swap times, {sw['family']} family at 224x224 ({sw['repeats']} repeats)", "",
        "ONNX bytes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sw["bytes"].items())
        + ".", "",
        "| what | median ms | min ms |", "|---|---:|---:|",
    ]
    labels = {
        "ort_session_from_file": "bare onnxruntime session from the file (reference)",
        "ort_session_from_bytes": "bare onnxruntime session from bytes (reference)",
        "cold_request_from_disk": "cold request: load from disk + first run",
        "hit_request": "hit request (resident)",
        "reload_from_disk": "re-load after eviction, from disk (set_budget)",
        "reload_from_host_bytes": "re-load after eviction, from host bytes (set_budget)",
        "downgrade_to_fp16": "downgrade base -> fp16 on a budget drop (break-before-make)",
        "downgrade_to_int8": "downgrade base -> int8 on a budget drop (break-before-make)",
        "upgrade_from_int8": "upgrade int8 -> base on a budget rise (make-before-break)",
    }
    for k, v in sw["seconds"].items():
        lines.append(f"| {labels[k]} | {1e3 * v['median']:.1f} | {1e3 * v['min']:.1f} |")
    (RESULTS / "cache.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    calls, blocks, repeats = (100, 5, 2) if args.quick else (250, 12, 5)
    results: dict = {"overhead": []}
    with tempfile.TemporaryDirectory(prefix="cache_bench.") as tmp:
        small = variants.Store(Path(tmp) / "small", create=True)
        variants.generate("resnet10", small, num_classes=10, resolution=32)
        variants.generate("bert-tiny", small)
        for model in ("resnet10", "bert-tiny"):
            results["overhead"].append(overhead(small, model, calls, blocks))
            print(results["overhead"][-1], flush=True)
        results["machinery"] = machinery(small, "resnet10", 20 * calls, blocks)
        family = variants.Store(Path(tmp) / "family", create=True)
        variants.generate("resnet18", family, quantize=["int8", "fp16"])
        results["swaps"] = swaps(family, "resnet18", repeats)
    write(results, args)
    print((RESULTS / "cache.md").read_text())
    print(f"wrote {RESULTS / 'cache.json'} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
