"""Load-test the example server: N concurrent clients for T seconds while the budget moves.

    python examples/server.py --store store --budget 1GiB &
    python examples/loadtest.py --url http://127.0.0.1:8000 --clients 16 --seconds 60 \\
        --budgets 400MiB,150MiB,1GiB --report loadtest.json

Each client picks a model (uniformly, or Zipf with --zipf), sends a random batch
shaped by the model's input signature (GET /v1/models), and records status and
latency. The budget is changed at evenly spaced times. Prints throughput,
p50/p99 latency, errors by status, swaps, and served accuracy per model, and
writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter

import httpx
import numpy as np


def make_inputs(signature: list[dict], batch: int, rng: np.random.Generator, *,
                spatial: int = 32, seq: int = 16):
    arrays = {}
    for spec in signature:
        shape = [batch if d == "batch" else seq if d == "seq" else spatial
                 if isinstance(d, str) else d for d in spec["shape"]]
        if spec["dtype"].startswith("int"):
            if spec["name"] == "attention_mask":
                arrays[spec["name"]] = np.ones(shape, np.int64).tolist()
            else:
                arrays[spec["name"]] = rng.integers(1000, 30000, shape).tolist()
        else:
            arrays[spec["name"]] = rng.standard_normal(shape).round(3).tolist()
    return arrays if len(arrays) > 1 else next(iter(arrays.values()))


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def run(url: str, clients: int, seconds: float, budgets: list[str], *, batch: int = 1,
        zipf: float = 0.0, spatial: int = 32, seed: int = 0) -> dict:
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
    names = [m["model"] for m in models]
    sigs = {m["model"]: m["inputs"] for m in models}
    weights = np.array([1.0 / (i + 1) ** zipf for i in range(len(names))])
    weights /= weights.sum()
    metrics_before = httpx.get(f"{url}/metrics", timeout=30).text
    lock = threading.Lock()
    records: list[tuple[str, int, float, str]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        pick = random.Random(seed + k)
        bodies = {n: {"inputs": make_inputs(sigs[n], batch, rng, spatial=spatial)}
                  for n in names}
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                m = pick.choices(names, weights)[0]
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/v1/models/{m}/infer", json=bodies[m])
                    status, variant = r.status_code, r.headers.get("X-Memadapt-Variant", "")
                except httpx.HTTPError as e:
                    status, variant = 0, type(e).__name__
                with lock:
                    records.append((m, status, time.perf_counter() - t0, variant))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    changes = []
    for i, b in enumerate(budgets):
        target = start + seconds * (i + 1) / (len(budgets) + 1)
        time.sleep(max(0.0, target - time.perf_counter()))
        t0 = time.perf_counter()
        r = httpx.put(f"{url}/v1/budget", json={"budget": b}, timeout=120)
        changes.append({"at_s": round(t0 - start, 2), "budget": b, "status": r.status_code,
                        "took_s": round(time.perf_counter() - t0, 3),
                        "resident": r.json().get("resident") if r.status_code == 200 else None})
    time.sleep(max(0.0, start + seconds - time.perf_counter()))
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    metrics_after = httpx.get(f"{url}/metrics", timeout=30).text
    final = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
    lat = np.array([r[2] for r in records if r[1] == 200])
    statuses = Counter(r[1] for r in records)
    per_model = {}
    for n in names:
        ok = [r for r in records if r[0] == n and r[1] == 200]
        per_model[n] = {
            "requests": sum(1 for r in records if r[0] == n), "ok": len(ok),
            "variants": dict(Counter(r[3] for r in ok)),
            "served_accuracy": next((m["served_accuracy"] for m in final if m["model"] == n),
                                    None)}
    return {
        "url": url, "clients": clients, "seconds": round(wall, 2), "batch": batch,
        "requests": len(records), "throughput_rps": round(len(records) / wall, 2),
        "latency_p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p99_s": float(np.percentile(lat, 99)) if len(lat) else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed": sum(v for k, v in statuses.items() if k != 200),
        "swaps": _metric(metrics_after, "memadapt_swaps_total")
        - _metric(metrics_before, "memadapt_swaps_total"),
        "cold_loads": _metric(metrics_after, "memadapt_cold_loads_total")
        - _metric(metrics_before, "memadapt_cold_loads_total"),
        "budget_changes": changes, "models": per_model,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--budgets", default="400MiB,150MiB,1GiB",
                    help="comma-separated budgets applied at evenly spaced times")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--zipf", type=float, default=0.0, help="model popularity skew (0: uniform)")
    ap.add_argument("--spatial", type=int, default=32, help="image side for CNN inputs")
    ap.add_argument("--report", default="loadtest.json")
    args = ap.parse_args(argv)
    rep = run(args.url, args.clients, args.seconds, [b for b in args.budgets.split(",") if b],
              batch=args.batch, zipf=args.zipf, spatial=args.spatial)
    with open(args.report, "w") as f:
        json.dump(rep, f, indent=2)
    p50 = rep["latency_p50_s"] or 0.0
    p99 = rep["latency_p99_s"] or 0.0
    print(f"{rep['requests']} requests in {rep['seconds']} s from {rep['clients']} clients: "
          f"{rep['throughput_rps']} req/s, p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    print(f"statuses {rep['statuses']}; failed {rep['failed']}; swaps {rep['swaps']:.0f}; "
          f"cold loads {rep['cold_loads']:.0f}")
    for c in rep["budget_changes"]:
        print(f"  t={c['at_s']:>6}s budget -> {c['budget']}: HTTP {c['status']} in "
              f"{c['took_s']} s; resident {c['resident']}")
    for n, m in rep["models"].items():
        acc = m["served_accuracy"]
        print(f"  {n}: {m['ok']}/{m['requests']} ok, served accuracy "
              f"{'-' if acc is None else f'{acc:.3f}'}, variants {m['variants']}")
    print(f"report written to {args.report}")
    return 0 if rep["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
