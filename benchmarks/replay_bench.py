"""Real replay vs simulation, per policy: does the real cache do what the simulator says?

For each policy (memadapt, infaas, lru by default) a 30-model Azure-like trace runs through
the real :class:`~adaptive.cache.VariantCache` (real onnxruntime sessions, the trace's clock,
:func:`adaptive.replay.replay`) and through :func:`adaptive.simulate` with the same policy,
candidates and planning budget. The store is the soak's (resnet18 and minilm with int8 and
exit variants, profiled at batch 1 on one thread; ``benchmarks/soak.py`` builds it, or
``--store``). Before each policy's replay its latencies and load times are measured
again, ``--profile-repeats`` times (the profiler's own path, one fresh process per variant
each time), and both sides run on the median of those profiles: on a shared machine the mean
of one profile's runs moves by up to 20% from one ten-second window to the next, so a
profile taken once, minutes before, predicts no better than that (``--no-reprofile`` replays
with the store's profile as it is). Each trace model is its own cache model backed by one of
the two stored models. The real cache runs with glibc's mmap threshold pinned, as the
profiler measured and ``memadapt serve`` runs.

``python benchmarks/replay_bench.py [--requests 3000] [--budget 600MiB] [--out DIR]`` writes
``replay.json`` and ``replay.md`` to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=None,
                    help="a profiled store (built as benchmarks/soak.py builds it when missing)")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--models", type=int, default=30)
    ap.add_argument("--budget", default="600MiB")
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile-repeats", type=int, default=5,
                    help="profiles taken before each policy's replay; both sides use their "
                         "median")
    ap.add_argument("--no-reprofile", dest="reprofile", action="store_false",
                    help="replay with the --store's profile as it is")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.profile_repeats < 1:
        ap.error(f"--profile-repeats must be >= 1, got {args.profile_repeats}")
    policies = args.policy or ["memadapt", "infaas", "lru"]

    from adaptive.catalog import candidates_from_catalog
    from adaptive.replay import replay
    from adaptive.traces import synth
    from benchmarks.soak import ensure_store

    tmp = tempfile.TemporaryDirectory(prefix="memadapt-replay-") if args.store is None else None
    args.store = ensure_store(args.store or Path(tmp.name) / "store")
    names = [f"svc{i:02d}" for i in range(args.models)]
    trace = synth("azure", names, args.requests, seed=args.seed, duration_s=3600)
    rows = []
    for p in policies:
        meter = _Background()
        cands = (median_profile(args.store, args.profile_repeats) if args.reprofile
                 else candidates_from_catalog(args.store, batch=1))
        profile_background = meter.share()
        print(f"replaying {len(trace)} requests with {p} ...", flush=True)
        meter = _Background()
        rep = replay(args.store, trace, budget=args.budget, policy=p, threads=1,
                     candidates=cands)
        background = meter.share()
        d = rep.to_dict()
        rows.append({"policy": p, "requests": rep.requests, "served": rep.served,
                     "profile": {c.variant: {"latency_ms": 1e3 * c.latency_s,
                                             "load_ms": 1e3 * c.load_s}
                                 for cs in cands.values() for c in cs},
                     "profile_background_cpu": profile_background,
                     "failures": rep.failures, "budget_bytes": rep.budget_bytes,
                     "plan_budget_bytes": rep.plan_budget_bytes, "wall_s": rep.wall_s,
                     "metrics": d["metrics"], "real_counts": d["real_counts"],
                     "runs": d["runs"],
                     "errors": list(rep.errors), "background_cpu": background})
    out = {"trace": {"kind": "azure", "models": args.models, "requests": args.requests,
                     "seed": args.seed, "duration_s": 3600},
           "budget": args.budget, "store": "resnet18 + minilm (int8, exit), batch 1, 1 thread",
           "profile_repeats": args.profile_repeats if args.reprofile else 0,
           "command": f"python benchmarks/replay_bench.py --requests {args.requests} "
                      f"--budget {args.budget}",
           "policies": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("replay.json", json.dumps(out, indent=2) + "\n"),
                       ("replay.md", _markdown(out))):
        tmp_path = args.out / (name + ".tmp")
        tmp_path.write_text(text)
        os.replace(tmp_path, args.out / name)
    print(_markdown(out))
    return 0


def median_profile(store: Path, repeats: int) -> dict:
    """The store's candidates at batch 1 with each variant's latency and load time the median
    of ``repeats`` fresh profiles (:func:`benchmarks.soak.reprofile`; memory and accuracy as
    the last one measured)."""
    from dataclasses import replace
    from statistics import median

    from adaptive.catalog import candidates_from_catalog
    from benchmarks.soak import reprofile

    seen: list[dict] = []
    for k in range(repeats):
        print(f"profiling the store ({k + 1}/{repeats}) ...", flush=True)
        reprofile(store)
        last = candidates_from_catalog(store, batch=1)
        seen.append({c.variant: c for cs in last.values() for c in cs})
    return {m: [replace(c, latency_s=median(s[c.variant].latency_s for s in seen),
                        load_s=median(s[c.variant].load_s for s in seen)) for c in cs]
            for m, cs in last.items()}


class _Background:
    """The share of the machine's CPU time that others (not this process or its children)
    used since construction: run times are only comparable on an equally quiet machine."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / hz  # all but idle and iowait
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), busy, own

    def share(self) -> float:
        (w0, b0, o0), (w1, b1, o1) = self.start, self._read()
        cpus = os.cpu_count() or 1
        return max(0.0, ((b1 - b0) - (o1 - o0)) / max((w1 - w0) * cpus, 1e-9))


def _markdown(out: dict) -> str:
    lines = [f"# Real replay vs simulation ({out['trace']['requests']} requests, "
             f"{out['trace']['models']} models, budget {out['budget']})", "",
             f"`{out['command']}`", "",
             "| policy | metric | simulated | real | difference |", "|---|---|---:|---:|---:|"]
    for row in out["policies"]:
        for m in row["metrics"]:
            if m["name"] in ("miss_rate", "stall_rate", "slo_attainment", "mean_latency_s",
                             "p99_latency_s", "evictions"):
                diff = m["difference"]
                name, scale, fmt = ((m["name"].replace("_s", "_ms"), 1e3, ".1f")
                                    if m["name"].endswith("_s") else (m["name"], 1, ".4f"))
                lines.append(f"| {row['policy']} | {name} | {m['simulated'] * scale:{fmt}} | "
                             f"{m['real'] * scale:{fmt}} | "
                             f"{'' if diff is None else format(diff, '+.1%')} |")
    lines += ["", "The simulator runs each request in its variant's profiled mean time and has no "
              "run-time variance, so its p99 is a profiled run or a load; the real p99 is the "
              "slowest 1% of real runs and loads.", "",
              "CPU time others used on the machine meanwhile (of all its cores), while "
              "profiling / replaying: "
              + ", ".join(f"{r['policy']} {r['profile_background_cpu']:.0%} / "
                          f"{r['background_cpu']:.0%}" for r in out["policies"]) + ".", "",
              f"The profile both sides used, taken before each policy's replay (median of "
              f"{out['profile_repeats']} profiles; mean run at batch 1; load: until it can "
              f"run):", "",
              "| variant | " + " | ".join(f"{r['policy']} latency ms | load ms"
                                          for r in out["policies"]) + " |",
              "|---|" + "---:|---:|" * len(out["policies"])]
    for v in sorted(out["policies"][0]["profile"]):
        lines.append(f"| {v} | " + " | ".join(
            f"{r['profile'][v]['latency_ms']:.2f} | {r['profile'][v]['load_ms']:.1f}"
            for r in out["policies"]) + " |")
    lines += ["", "Where a latency gap comes from: each served variant's hits (a run and what the "
              "cache adds to it, no wait) in the real replay beside its profiled run:", "",
              "| policy | variant | hits | profiled ms | real ms | difference |",
              "|---|---|---:|---:|---:|---:|"]
    for row in out["policies"]:
        for r in row.get("runs", ()):
            lines.append(f"| {row['policy']} | {r['variant']} | {r['hits']} | "
                         f"{r['profiled_s'] * 1e3:.2f} | {r['real_mean_s'] * 1e3:.2f} | "
                         f"{'' if r['difference'] is None else format(r['difference'], '+.1%')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
