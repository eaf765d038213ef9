"""Load-test `memadapt serve` with tritonclient: N clients for T seconds while the budget moves.

    memadapt serve demo-store --budget 1GiB --port 8000 &
    python examples/loadtest.py --url 127.0.0.1:8000 --clients 16 --seconds 60 \\
        --budgets 300MiB,150MiB,1GiB --report loadtest.json

Each client (its own ``tritonclient.http.InferenceServerClient``) picks a model (uniformly,
or Zipf with --zipf), sends a random batch shaped by the model's metadata as binary tensors,
and records status, latency and the variant that served. The budget is changed through
``PUT /v2/memadapt/budget`` at evenly spaced times (what is resident is read in the answer
and again a second later). Prints throughput, p50/p99 latency, errors by status, swaps and
cold loads (in all and per budget phase) and served accuracy per model, and writes a JSON
report.
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
import tritonclient.http as th
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException


def make_inputs(meta: dict, batch: int, rng: np.random.Generator, *, spatial: int = 32,
                seq: int = 16) -> list:
    """Random inputs for a model's metadata: -1 axes are batch first, then seq (integer
    inputs) or spatial (float inputs)."""
    out = []
    for t in meta["inputs"]:
        integer = t["datatype"].startswith(("INT", "UINT"))
        shape = [batch if i == 0 and d == -1 else (seq if integer else spatial) if d == -1
                 else d for i, d in enumerate(t["shape"])]
        if t["name"] == "attention_mask":
            arr = np.ones(shape, np.int64)
        elif integer:
            arr = rng.integers(1000, 30000, shape).astype(np.int64)
        else:
            arr = rng.standard_normal(shape).astype(np.float32)
        i = th.InferInput(t["name"], shape, t["datatype"])
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


def _metrics(http: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{http}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _sum(metrics: dict, name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def run(url: str, clients: int, seconds: float, budgets: list[str], *, batch: int = 1,
        zipf: float = 0.0, spatial: int = 32, seed: int = 0) -> dict:
    http = f"http://{url}"
    admin = th.InferenceServerClient(url, network_timeout=120)
    names = sorted(r["name"] for r in admin.get_model_repository_index())
    metas = {n: admin.get_model_metadata(n) for n in names}
    weights = np.array([1.0 / (i + 1) ** zipf for i in range(len(names))])
    weights /= weights.sum()
    before = _metrics(http)
    lock = threading.Lock()
    records: list[tuple[str, int, float, str]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        pick = random.Random(seed + k)
        inputs = {n: make_inputs(metas[n], batch, rng, spatial=spatial) for n in names}
        c = th.InferenceServerClient(url, network_timeout=120)
        while not stop.is_set():
            m = pick.choices(names, weights)[0]
            t0 = time.perf_counter()
            try:
                r = c.infer(m, inputs[m])
                status, variant = 200, r.get_response()["parameters"]["memadapt_variant"]
            except InferenceServerException as e:
                status, variant = int(e.status() or 0), e.message()[:80]
            with lock:
                records.append((m, status, time.perf_counter() - t0, variant))
        c.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    changes = []
    marks = [before]  # /metrics at each change: cold loads and swaps per phase
    for i, b in enumerate(budgets):
        target = start + seconds * (i + 1) / (len(budgets) + 1)
        time.sleep(max(0.0, target - time.perf_counter()))
        marks.append(_metrics(http))
        t0 = time.perf_counter()
        r = httpx.put(f"{http}/v2/memadapt/budget", json={"budget": b}, timeout=120)
        ok = r.status_code == 200
        changes.append({"at_s": round(t0 - start, 2), "budget": b, "status": r.status_code,
                        "took_s": round(time.perf_counter() - t0, 3),
                        "plan_budget_bytes": r.json().get("plan_budget_bytes") if ok else None,
                        # right after the change a model may be between variants (loading)
                        "resident": r.json().get("resident") if ok else None})
        time.sleep(1.0)
        changes[-1]["resident_1s_later"] = httpx.get(f"{http}/v2/memadapt/budget",
                                                     timeout=30).json().get("resident")
    time.sleep(max(0.0, start + seconds - time.perf_counter()))
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = _metrics(http)
    marks.append(after)
    phases = [{"budget": b, "cold_loads": _sum(m1, "memadapt_cold_loads_total")
               - _sum(m0, "memadapt_cold_loads_total"),
               "swaps": _sum(m1, "memadapt_swaps_total") - _sum(m0, "memadapt_swaps_total")}
              for b, m0, m1 in zip(["start", *budgets], marks, marks[1:])]
    admin.close()
    lat = np.array([r[2] for r in records if r[1] == 200])
    statuses = Counter(r[1] for r in records)
    per_model = {}
    for n in names:
        ok = [r for r in records if r[0] == n and r[1] == 200]
        acc = after.get(("memadapt_served_accuracy", (("model", n),)))
        per_model[n] = {"requests": sum(1 for r in records if r[0] == n), "ok": len(ok),
                        "variants": dict(Counter(r[3] for r in ok)), "served_accuracy": acc}
    return {
        "url": url, "client": "tritonclient.http (binary tensors)", "clients": clients,
        "seconds": round(wall, 2), "batch": batch, "requests": len(records),
        "throughput_rps": round(len(records) / wall, 2),
        "latency_p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p99_s": float(np.percentile(lat, 99)) if len(lat) else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed": sum(v for k, v in statuses.items() if k != 200),
        "swaps": _sum(after, "memadapt_swaps_total") - _sum(before, "memadapt_swaps_total"),
        "cold_loads": _sum(after, "memadapt_cold_loads_total")
        - _sum(before, "memadapt_cold_loads_total"),
        "budget_changes": changes, "phases": phases, "models": per_model,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8000", help="host:port of memadapt serve")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--budgets", default="300MiB,150MiB,1GiB",
                    help="comma-separated budgets applied at evenly spaced times")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--zipf", type=float, default=0.0, help="model popularity skew (0: uniform)")
    ap.add_argument("--spatial", type=int, default=32, help="image side for CNN inputs")
    ap.add_argument("--report", default="loadtest.json")
    args = ap.parse_args(argv)
    rep = run(args.url.removeprefix("http://"), args.clients, args.seconds,
              [b for b in args.budgets.split(",") if b], batch=args.batch, zipf=args.zipf,
              spatial=args.spatial)
    with open(args.report, "w") as f:
        json.dump(rep, f, indent=2)
    p50 = rep["latency_p50_s"] or 0.0
    p99 = rep["latency_p99_s"] or 0.0
    print(f"{rep['requests']} requests in {rep['seconds']} s from {rep['clients']} clients: "
          f"{rep['throughput_rps']} req/s, p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    print(f"statuses {rep['statuses']}; failed {rep['failed']}; swaps {rep['swaps']:.0f}; "
          f"cold loads {rep['cold_loads']:.0f}")
    for c, ph in zip(rep["budget_changes"], rep["phases"][1:]):
        print(f"  t={c['at_s']:>6}s budget -> {c['budget']}: HTTP {c['status']} in "
              f"{c['took_s']} s; resident {c['resident']}, 1 s later "
              f"{c['resident_1s_later']}; {ph['cold_loads']:.0f} cold loads, "
              f"{ph['swaps']:.0f} swaps until the next change")
    for n, m in rep["models"].items():
        acc = m["served_accuracy"]
        print(f"  {n}: {m['ok']}/{m['requests']} ok, served accuracy "
              f"{'-' if acc is None else f'{acc:.3f}'}, variants {m['variants']}")
    print(f"report written to {args.report}")
    return 0 if rep["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
