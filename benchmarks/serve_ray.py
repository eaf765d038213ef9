"""`memadapt serve --ray --replicas 2` against Ray Serve's own multiplexing LRU, same memory.

Thirty served models (``m00``..``m29``; even ones resnet10 at 32x32, odd ones bert-tiny, each
a real stored model with its own weights, base and int8 variant) take a 30-model Azure-like
trace (``adaptive.traces.synth("azure", ...)``) from a few ``tritonclient.http`` clients,
closed loop in trace order. Both systems run on one local Ray instance behind the same
ingress (:class:`adaptive.serve.scaleout.Router`, requests on ``/v2/models/M/infer`` with the
binary tensor extension), each with 2 replicas:

* **memadapt**: :func:`adaptive.serve.scaleout.serve_ray` (what ``memadapt serve STORE --ray
  --replicas 2`` calls), each replica its own ``VariantCache`` with budget = total / 2;
* **serve-lru-K**: a replica that holds plain onnxruntime sessions of each model's base
  variant in ``@serve.multiplexed(max_num_models_per_replica=K)``, Serve's count-limited LRU,
  for each K of a sweep. A K whose K largest base variants fit the per-replica budget is "at
  the same memory"; larger K are run and reported with the memory they were measured to take.

Only the two base families are profiled (``memadapt profile``, batch 1); every served model
gets its family's measured candidates under its own variant names (same architecture, same
bytes), round-robin as :func:`adaptive.catalog.map_population` gives a population its
families. Per system: miss rate (requests that arrived while their model was not loaded and
waited for a load), p50/p99 latency, throughput, failed requests, peak RSS per replica sampled
every 50 ms from outside (psutil on the replica processes), and for memadapt the most bytes
each replica's cache charged against its budget (``GET /v2/memadapt/budget`` polled during
the run; each answer names the replica that gave it).

    flock /tmp/memadapt-heavy.lock python benchmarks/serve_ray.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

MODELS = 30
FAMILIES = ("resnet10", "bert-tiny")


def build_store(root: Path, models: int = MODELS) -> None:
    """Generate ``models`` named models (alternating families) and profile the first two."""
    import profiler
    import variants

    for k in range(models):
        name = f"m{k:02d}"
        if k % 2 == 0:
            variants.generate("resnet10", root, name=name, quantize=["int8"], num_classes=10,
                              resolution=32, seed=k)
        else:
            variants.generate("bert-tiny", root, name=name, quantize=["int8"], seed=k)
    profiler.profile(root, batches=(1,), runs=5, threads=1, variants=["m00", "m00+int8",
                                                                       "m01", "m01+int8"])


def write_profiles(store: Any, path: Path, models: int = MODELS) -> dict[str, list]:
    """A ``--profiles`` file: each model gets its family's measured candidates, renamed."""
    from dataclasses import replace

    from adaptive.catalog import candidates_from_catalog, demands_to_json
    from adaptive.select import ModelDemand

    measured = candidates_from_catalog(store, batch=1)
    fams = [measured[f"m{k:02d}"] for k in range(len(FAMILIES))]
    cands = {}
    for k in range(models):
        name = f"m{k:02d}"
        src = f"m{k % len(fams):02d}"
        cands[name] = [replace(c, variant=c.variant.replace(src, name, 1))
                       for c in fams[k % len(fams)]]
    path.write_text(json.dumps(demands_to_json([ModelDemand(m, cs) for m, cs in
                                                cands.items()])))
    return cands


class LRUReplica:
    """Ray Serve's own answer: base-variant onnxruntime sessions in ``@serve.multiplexed``,
    evicted least recently used once a replica holds ``k`` of them (a count, not bytes)."""

    def __init__(self, store: str, k: int, threads: int = 1):
        from ray import serve

        from adaptive.serve.oip import TensorSpec
        from profiler.memory import pin_allocator
        from variants.store import Store

        pin_allocator()  # as memadapt's replicas do: freed sessions give their memory back
        self.store, self.threads, self.loaded = Store(store), threads, set()
        self.specs = {}
        for name in self.store.names():
            man = self.store.get(name)
            if man.base == name:
                self.specs[name] = (tuple(TensorSpec.from_manifest(d) for d in man.inputs),
                                    (TensorSpec(man.outputs[0], "FP32", ()),))
        loaded = self.loaded

        class Held:
            def __init__(self, name: str, session: Any):
                self.name, self.session = name, session

            def __del__(self) -> None:  # Serve calls it on eviction
                loaded.discard(self.name)
                self.session = None

        async def load(model: str) -> Any:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = self.threads
            path = str(self.store.get(model).onnx_path)
            sess = await asyncio.to_thread(ort.InferenceSession, path, opts,
                                           providers=["CPUExecutionProvider"])
            loaded.add(model)
            return Held(model, sess)

        self.get_model = serve.multiplexed(max_num_models_per_replica=k)(load)

    async def handle(self, method: str, path: str, query: bytes,
                     headers: list[tuple[bytes, bytes]], body: bytes
                     ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        from ray import serve

        from adaptive.serve.oip import HEADER_LENGTH, OIPError, decode_request, encode_response
        from adaptive.serve.scaleout import REPLICA_HEADER

        model = serve.get_multiplexed_model_id()
        if model not in self.specs:
            return 404, [], json.dumps({"error": f"unknown model {model!r}"}).encode()
        cold = model not in self.loaded
        held = await self.get_model(model)
        hdr = {k.decode().lower(): v.decode() for k, v in headers}
        ins, outs = self.specs[model]
        try:
            req = decode_request(body, hdr.get(HEADER_LENGTH.lower()), ins, outs, 8)
        except OIPError as e:
            return e.status, [], json.dumps({"error": str(e)}).encode()
        out = await asyncio.to_thread(held.session.run, None, req.inputs)
        content, head = encode_response(model, model, req, {outs[0].name: out[0]},
                                        {"memadapt_variant": model, "memadapt_cold": cold})
        h = [(REPLICA_HEADER.encode(), str(os.getpid()).encode())]
        if head is not None:
            h.append((HEADER_LENGTH.encode(), str(head).encode()))
        return 200, h, content


class RSSSampler:
    """Peak RSS of each process whose command line names ``tag``, sampled from outside."""

    def __init__(self, tag: str, every_s: float = 0.05):
        self.tag, self.every_s = tag, every_s
        self.peak: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pids(self) -> list[int]:
        import psutil

        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if self.tag in " ".join(p.info["cmdline"] or []):
                out.append(p.info["pid"])
        return out

    def sample(self) -> None:
        import psutil

        for pid in self._pids:
            try:
                r = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            self.first.setdefault(pid, r)
            self.peak[pid] = max(self.peak.get(pid, 0), r)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every_s)

    def __enter__(self) -> RSSSampler:
        self._pids = self.pids()
        if not self._pids:
            raise RuntimeError(f"no process runs {self.tag!r}")
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def drive(url: str, trace: Any, inputs: dict[str, list], clients: int,
          poll_budget: bool, compute_s: dict[str, float]) -> dict[str, Any]:
    """Send the trace's requests in order from ``clients`` tritonclient threads."""
    import httpx
    import numpy as np
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    names = [trace.models[i] for i in trace.model]
    nxt = iter(range(len(names)))
    lock = threading.Lock()
    recs: list[tuple[int, bool, float, str]] = []
    budgets: dict[str, dict[str, int]] = {}
    stop = threading.Event()

    def client() -> None:
        c = th.InferenceServerClient(url, network_timeout=120)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            m = names[i]
            t0 = time.perf_counter()
            try:
                r = c.infer(m, inputs[m])
                p = r.get_response()["parameters"]
                rec = (200, bool(p["memadapt_cold"]), time.perf_counter() - t0,
                       p["memadapt_variant"])
            except InferenceServerException as e:
                rec = (int(e.status() or 0), False, time.perf_counter() - t0, e.message()[:80])
            with lock:
                recs.append(rec)
        c.close()

    def poller() -> None:
        with httpx.Client(timeout=30) as h:
            while not stop.is_set():
                r = h.get(f"http://{url}/v2/memadapt/budget")
                if r.status_code == 200:
                    b = r.json()
                    who = r.headers.get("x-memadapt-replica", "?")
                    seen = budgets.setdefault(who, {"budget_bytes": b["budget_bytes"],
                                                    "max_resident_bytes": 0, "polls": 0})
                    seen["max_resident_bytes"] = max(seen["max_resident_bytes"],
                                                     b["resident_bytes"])
                    seen["budget_bytes"] = b["budget_bytes"]
                    seen["polls"] += 1
                stop.wait(0.2)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    pt = threading.Thread(target=poller, daemon=True) if poll_budget else None
    t0 = time.perf_counter()
    for t in threads + ([pt] if pt else []):
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    if pt:
        pt.join()
    ok = [r for r in recs if r[0] == 200]
    lat = np.array([r[2] for r in ok])
    base = sum(1 for r in ok if "+" not in r[3])
    return {"requests": len(recs), "failed": len(recs) - len(ok),
            "statuses": {str(k): v for k, v in sorted(Counter(r[0] for r in recs).items())},
            "misses": sum(r[1] for r in ok), "miss_rate": sum(r[1] for r in ok) / len(recs),
            "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)),
            "throughput_rps": len(recs) / wall, "wall_s": wall,
            "served_by_base_variant": base / max(1, len(ok)),
            # what the variants that served cost to run, as profiled (batch 1, one thread)
            "profiled_compute_ms_per_request": 1e3 * sum(compute_s[r[3]] for r in ok)
            / max(1, len(ok)),
            **({"budget_polls": budgets} if poll_budget else {})}


def replica_counters(url: str, tries: int = 40) -> dict[str, dict[str, float]]:
    """Loads and swaps per memadapt replica, from ``/metrics`` (each answer names its replica;
    requests without a model reach either one)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    names = ("memadapt_requests_total", "memadapt_misses_total", "memadapt_cold_loads_total",
             "memadapt_prefetches_total", "memadapt_swaps_total", "memadapt_evictions_total",
             "memadapt_rebalances_total")
    out: dict[str, dict[str, float]] = {}
    for _ in range(tries):
        r = httpx.get(f"http://{url}/metrics", timeout=30)
        if r.status_code != 200:
            continue
        got = dict.fromkeys(names, 0.0)
        for f in text_string_to_metric_families(r.text):
            for smp in f.samples:
                if smp.name in got:
                    got[smp.name] += smp.value
        out[r.headers.get("x-memadapt-replica", "?")] = got
    return out


def client_inputs(store: Any, models: list[str]) -> dict[str, list]:
    """tritonclient inputs per model from its manifest (as examples/loadtest.py builds them)."""
    import numpy as np
    from loadtest import make_inputs

    from adaptive.serve.oip import TensorSpec

    rng = np.random.default_rng(0)
    out = {}
    for m in models:
        meta = {"inputs": [TensorSpec.from_manifest(d).to_json() for d in store.get(m).inputs]}
        out[m] = make_inputs(meta, 1, rng)
    return out


def wait_ready(url: str, models: list[str], timeout_s: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"http://{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


def run_system(name: str, deploy: Any, app: str, replica: str, url: str, trace: Any,
               inputs: dict, clients: int, memadapt: bool,
               compute_s: dict[str, float]) -> dict[str, Any]:
    from ray import serve

    deploy()  # serve.run returns once the replicas are up
    if memadapt:
        wait_ready(url, list(trace.models))
    time.sleep(2)
    sampler = RSSSampler(f"ServeReplica:{app}:{replica}")
    with sampler:
        idle = dict(sampler.first)
        res = drive(url, trace, inputs, clients, poll_budget=memadapt,
                    compute_s=compute_s)
    if memadapt:
        res["replica_counters"] = replica_counters(url)
    serve.delete(app)
    res["system"] = name
    res["replicas"] = [{"pid": pid, "rss_idle_bytes": idle.get(pid),
                        "rss_peak_bytes": sampler.peak[pid]} for pid in sorted(sampler.peak)]
    res["rss_peak_per_replica_bytes"] = max(sampler.peak.values())
    res["rss_peak_over_idle_bytes"] = max(sampler.peak[p] - idle.get(p, sampler.peak[p])
                                          for p in sampler.peak)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="600 requests, K in {2, 4}")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--ks", default=None, help="comma-separated K to sweep for the baseline")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--budget-fraction", type=float, default=0.3,
                    help="total memory as a fraction of all 30 base variants")
    ap.add_argument("--store", type=Path, default=None, help="a store to reuse (built if empty)")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    cmdargs = list(sys.argv[1:] if argv is None else argv)
    arenas = os.environ.get("MALLOC_ARENA_MAX")
    n = args.requests or (600 if args.quick else 3000)
    ks = [int(k) for k in (args.ks or ("2,4" if args.quick else "2,3,4,8")).split(",")]

    import ray
    from ray import serve

    from adaptive.serve.scaleout import Router, serve_ray
    from adaptive.serve.server import ServeConfig
    from adaptive.traces import synth
    from variants.backends import CPU_MEM_REUSE
    from variants.store import Store

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="memadapt-serve-ray-")
        args.store = Path(tmp.name) / "store"
    if len(list((args.store / "variants").glob("m*"))) < 2 * MODELS:
        print(f"generating {MODELS} models and profiling two in {args.store} ...", flush=True)
        build_store(args.store)
    store = Store(args.store)
    profiles = args.store / "serve_ray_profiles.json"
    cands = write_profiles(store, profiles)
    names = sorted(cands)
    base = {m: next(c.memory_bytes for c in cs if c.variant == m) for m, cs in cands.items()}
    total = int(args.budget_fraction * sum(base.values()))
    per_replica = total // 2
    same_memory_k = per_replica // max(base.values())
    compute = {c.variant: c.latency_s for cs in cands.values() for c in cs}
    trace = synth("azure", names, n, seed=args.seed)
    inputs = client_inputs(store, names)
    url = f"127.0.0.1:{args.port}"

    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
             log_to_driver=False)
    systems = []
    try:
        cfg = ServeConfig(str(args.store), budget=per_replica, profiles=str(profiles),
                          threads=1, max_batch=1, port=args.port)
        print(f"memadapt: 2 replicas x {per_replica / 2**20:.0f} MiB", flush=True)
        systems.append(run_system("memadapt", lambda: serve_ray(cfg, 2, block=False),
                                  "memadapt", "memadapt-replica", url, trace, inputs,
                                  args.clients, True, compute))
        for k in ks:
            print(f"serve-lru-{k}", flush=True)
            dep = serve.deployment(LRUReplica, name="lru-replica", num_replicas=2,
                                   ray_actor_options={"num_cpus": 0})
            router = serve.deployment(Router, name="lru-router",
                                      ray_actor_options={"num_cpus": 0})

            def deploy(dep=dep, router=router, k=k):
                serve.run(router.bind(dep.bind(str(args.store), k, 1)), name="lru",
                          route_prefix="/")

            r = run_system(f"serve-lru-{k}", deploy, "lru", "lru-replica", url, trace, inputs,
                           args.clients, False, compute)
            r["k"] = k
            r["same_memory"] = k <= same_memory_k
            systems.append(r)
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    ma = systems[0]
    within = {pid: b["max_resident_bytes"] <= b["budget_bytes"]
              for pid, b in ma["budget_polls"].items()}
    ma["within_budget"] = bool(within) and all(within.values())
    fair = [s for s in systems[1:] if s["same_memory"]] or systems[1:]
    best = min(fair, key=lambda s: (s["miss_rate"], s["latency_p99_s"]))
    rep = {
        "meta": {"models": MODELS, "families": list(FAMILIES), "requests": n,
                 "trace": f"adaptive.traces.synth('azure', 30 models, {n}, seed={args.seed})",
                 "clients": args.clients, "replicas": 2, "total_budget_bytes": total,
                 "per_replica_budget_bytes": per_replica,
                 "budget_fraction_of_all_base": args.budget_fraction,
                 "base_variant_bytes": {"resnet10": base["m00"], "bert-tiny": base["m01"]},
                 "same_memory_k": same_memory_k, "ks": ks, "quick": args.quick,
                 "client": "tritonclient.http, binary tensors, POST /v2/models/M/infer through "
                           "the same Ray Serve ingress (scaleout.Router) for both systems",
                 "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
                 "command": " ".join((["MEMADAPT_ORT_MEM_REUSE=1"] if CPU_MEM_REUSE else [])
                                     + [f"MALLOC_ARENA_MAX={arenas}"] * (arenas is not None)
                                     + ["flock /tmp/memadapt-heavy.lock",
                                        "python benchmarks/serve_ray.py", *cmdargs]),
                 "ort_mem_reuse": CPU_MEM_REUSE,
                 # glibc's malloc arenas per replica process (None: its default, 8 per core)
                 "malloc_arena_max": arenas,
                 "notes": ["clients send the trace's requests in its order, closed loop (the "
                           "trace's timestamps are not replayed)",
                           "peak RSS is the whole replica process (Python, Ray, onnxruntime "
                           "and its sessions); rss_peak_over_idle is the growth from before "
                           "the first request"]},
        "systems": systems, "best_baseline": best["system"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_ray.json").write_text(json.dumps(rep, indent=2) + "\n")
    (args.out / "serve_ray.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


def markdown(rep: dict[str, Any]) -> str:
    m = rep["meta"]
    mib = 2**20
    lines = [f"# memadapt on Ray Serve vs Serve's multiplexing LRU ({m['requests']} requests, "
             f"{m['models']} models)", "",
             f"`{m['command']}`. Trace: {m['trace']}; {m['clients']} closed-loop "
             f"clients; 2 replicas each; total memory {m['total_budget_bytes'] / mib:.0f} MiB "
             f"({m['budget_fraction_of_all_base']:.0%} of all base variants), "
             f"{m['per_replica_budget_bytes'] / mib:.0f} MiB per replica; K <= "
             f"{m['same_memory_k']} fits that count-for-count. {m['client']}. {m['machine']}.",
             "", "| system | miss rate | p50 ms | p99 ms | req/s | failed | peak RSS / replica "
             "MiB | RSS growth MiB | within budget | served by base | profiled compute ms/req |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for s in rep["systems"]:
        wb = ("yes" if s["within_budget"] else "NO") if "within_budget" in s else (
            "(no budget; same memory)" if s.get("same_memory") else "(no budget; more memory)")
        lines.append(f"| {s['system']} | {s['miss_rate']:.3f} | {s['latency_p50_s'] * 1e3:.1f} | "
                     f"{s['latency_p99_s'] * 1e3:.1f} | {s['throughput_rps']:.0f} | "
                     f"{s['failed']} | {s['rss_peak_per_replica_bytes'] / mib:.0f} | "
                     f"{s['rss_peak_over_idle_bytes'] / mib:.0f} | {wb} | "
                     f"{s['served_by_base_variant']:.0%} | "
                     f"{s['profiled_compute_ms_per_request']:.2f} |")
    lines += ["", f"Best baseline at the same memory: {rep['best_baseline']}.", ""]
    ma = rep["systems"][0]
    if ma.get("replica_counters"):
        lines += ["memadapt's replicas (from their `/metrics`): " + "; ".join(
            f"pid {pid}: " + ", ".join(f"{k.removeprefix('memadapt_').removesuffix('_total')} "
                                       f"{v:.0f}" for k, v in c.items())
            for pid, c in ma["replica_counters"].items()) + ".", ""]
        lines += ["Budgets (polled `GET /v2/memadapt/budget`): " + "; ".join(
            f"pid {pid}: most charged {b['max_resident_bytes'] / mib:.1f} of "
            f"{b['budget_bytes'] / mib:.1f} MiB over {b['polls']} polls"
            for pid, b in ma["budget_polls"].items()) + ".", ""]
    lines += [f"- {n}" for n in m["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
