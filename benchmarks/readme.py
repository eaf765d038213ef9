"""Render the README's figures from the committed results, so a figure nobody can reproduce
cannot stay in it.

The README holds generated blocks between ``<!-- BEGIN name -->`` and ``<!-- END name -->``;
each is rendered here from ``benchmarks/results/*.json``. ``tests/test_readme.py`` fails when
the README differs from what this renders.

Run:  python benchmarks/readme.py            (rewrite the blocks in README.md)
      python benchmarks/readme.py --check    (exit 1 when README.md is stale)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(results: Path, name: str) -> dict[str, Any]:
    return json.loads((results / name).read_text())


def headline(results: Path) -> str:
    """The policy headline from ``policies.json``."""
    rep = _load(results, "policies.json")
    meta, s, rows = rep["meta"], rep["summary"], rep["results"]
    from adaptive.policies import competitors
    from adaptive.report import best_static_summary

    comp = competitors(meta["policies"])
    comp = ["infaas"] + [p for p in comp if p != "infaas"]
    pops = [p["population"] for p in rep["populations"]]
    lines = [
        f"**Headline** (`python benchmarks/policies.py`; every row in "
        f"`benchmarks/results/policies.json`, tables in `policies.md`, plots "
        f"`policies-<population>.png`). {len(pops)} populations "
        f"({', '.join(f'`{p}`' for p in pops)}) x {len(meta['kinds'])} traces "
        f"({', '.join(meta['kinds'])}) x {len(meta['fractions'])} budgets "
        f"({meta['fractions'][0]:.0%}-{meta['fractions'][-1]:.0%} of all base variants) = "
        f"{s['cells']} cells, {meta['requests']:,} requests each over {meta['models']} "
        f"models. memadapt against every online policy a user would pick instead "
        f"({', '.join(comp)}), with the offline `belady` (Belady-Size) and `bound` (PFOO-L "
        f"tightened by FOO-L: no policy can miss less) as references:",
        "",
        "| check (memadapt vs every online policy) | cells where it holds |",
        "| --- | ---: |",
        f"| miss + stall rate <= every online policy | {s['late']} / {s['cells']} |",
        f"| SLO attainment >= every online policy | {s['slo']} / {s['cells']} |",
        f"| normalized accuracy >= infaas - 0.005 | {s['normalized']} / {s['cells']} |",
        f"| highest effective accuracy of all online policies | {s['effective']} / "
        f"{s['cells']} |",
        f"| no floor violations | {s['floors']} / {s['cells']} |",
        f"| **all of the above** | **{s['holds']} / {s['cells']}** |",
        "",
    ]
    lines += ["| population / trace | budget | memadapt miss+stall | infaas | best other online "
              "| bound | memadapt eff. acc. | infaas | best other |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for pop in pops:
        for kind in meta["kinds"]:
            for frac in (0.1, 0.3):
                cell = {r["policy"]: r for r in rows if r["population"] == pop
                        and r["kind"] == kind and abs(r["budget_fraction"] - frac) < 1e-9}
                if not cell:
                    continue

                def late(p: str, cell: dict = cell) -> float:
                    return cell[p]["miss_rate"] + cell[p]["stall_rate"]

                others = [p for p in comp if p != "infaas"]
                bl = min(others, key=late)
                be = max(others, key=lambda p, cell=cell: cell[p]["effective_accuracy"])
                lines.append(
                    f"| {pop} / {kind} | {frac:.0%} | {late('memadapt'):.4f} | "
                    f"{late('infaas'):.4f} | {late(bl):.4f} ({bl}) | "
                    f"{cell['bound']['miss_rate']:.4f} | "
                    f"{cell['memadapt']['effective_accuracy']:.4f} | "
                    f"{cell['infaas']['effective_accuracy']:.4f} | "
                    f"{cell[be]['effective_accuracy']:.4f} ({be}) |")
    lines.append("")
    if s["bound_ratio_max"] is not None:
        bel = s["belady_bound_ratio_median"]
        hard = sum(1 for x in s["bound_ratios"] if x["above_compulsory"])
        lines += [f"Where the bound is above the compulsory misses ({hard} of {s['cells']} "
                  f"cells), memadapt's miss rate is {s['bound_ratio_median']:.2f}x the bound "
                  f"at the median and {s['bound_ratio_max']:.2f}x at worst, so the 1.3x target "
                  f"is not met; the offline Belady-Size is {bel:.2f}x at the median. The bound "
                  f"is an LP relaxation (fractional hits, capacity per group of instants), not "
                  f"a schedule a policy could follow; most of the gap is what an online policy "
                  f"does not know of the future.", ""]
        z = s.get("static_irm_summary")
        if z:
            lines += [best_static_summary(z), ""]
    if rep.get("timing"):
        tm = ", ".join(f"{t['policy']} {t['simulate_s']:.1f} s" for t in rep["timing"])
        t0 = rep["timing"][0]
        lines += [f"The simulator replays {t0['requests']:,} requests over {t0['models']} "
                  f"models in {tm} (same file, `timing`).", ""]
    if s["short"]:
        lines += [f"It falls short in {len(s['short'])} cells:", ""]
        lines += _shortfalls(rep, top_of=comp) + [""]
    lines += heldout(results)
    return "\n".join(lines).rstrip() + "\n"


def heldout(results: Path) -> list[str]:
    """The same checks on runs the defaults were never tuned on (``heldout*/``), if any."""
    lines: list[str] = []
    for path in sorted(results.glob("heldout*/policies.json")):
        rep = json.loads(path.read_text())
        meta, s = rep["meta"], rep["summary"]
        lines += [f"Held out (`{meta['command']}`: {meta['models']} models, other clones, "
                  f"jitter and traces than the run above, defaults untouched): all checks hold in "
                  f"**{s['holds']} / {s['cells']}** cells (miss + stall {s['late']}, SLO "
                  f"{s['slo']}, normalized {s['normalized']}, effective accuracy "
                  f"{s['effective']}); bound ratio {s['bound_ratio_median']:.2f}x at the median, "
                  f"{s['bound_ratio_max']:.2f}x at worst. Where it falls short:", ""]
        lines += _shortfalls(rep, most=3) + [""]
    return lines


def _shortfalls(rep: dict[str, Any], *, top_of: list[str] | None = None,
                most: int | None = None) -> list[str]:
    """One line per cell where memadapt falls short: what failed (the first ``most``
    shortfalls) and the late requests of memadapt, infaas and, with ``top_of``, of the policy
    among those with the highest effective accuracy."""
    from adaptive.report import accuracy_lost

    n, rows, out = rep["meta"]["requests"], rep["results"], []
    for x in rep["summary"]["short"]:
        cell = {r["policy"]: r for r in rows if r["population"] == x["population"]
                and r["kind"] == x["kind"] and r["budget_fraction"] == x["budget_fraction"]}
        late = {p: round((r["miss_rate"] + r["stall_rate"]) * n) for p, r in cell.items()
                if p != "bound"}
        also = lost = ""
        if top_of:
            top = max(top_of, key=lambda p, cell=cell: cell[p]["effective_accuracy"])
            also = f", {top} {late[top]}" if top != "infaas" else ""
            if "accuracy_lost_rungs" in cell["memadapt"]:
                lost = (f"; accuracy lost to late requests / to smaller variants: memadapt "
                        f"{accuracy_lost(cell['memadapt'])}, {top} {accuracy_lost(cell[top])}")
        what = x["shortfalls"] if most is None else x["shortfalls"][:most]
        more = " ..." if most is not None and len(x["shortfalls"]) > most else ""
        out.append(f"- {x['population']} / {x['kind']} / {x['budget_fraction']:.0%}: "
                   f"{'; '.join(what)}{more} (late requests of {n:,}: memadapt "
                   f"{late['memadapt']}, infaas {late['infaas']}{also}{lost})")
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def _why(ma: dict[str, Any], bl: dict[str, Any]) -> str:
    """What the serve_ray results show memadapt paid for its misses and budget."""
    c = list(ma.get("replica_counters", {}).values())
    total = {k: sum(x.get(f"memadapt_{k}_total", 0.0) for x in c)
             for k in ("cold_loads", "prefetches", "swaps", "evictions")}
    return (f"its replicas made {total['cold_loads']:.0f} cold loads, "
            f"{total['prefetches']:.0f} prefetches, {total['swaps']:.0f} swaps and "
            f"{total['evictions']:.0f} evictions on the 2 shared cores against "
            f"{bl['misses']} missed requests of the baseline, and the variants it served "
            f"(int8 to fit more models) cost {ma['profiled_compute_ms_per_request']:.2f} vs "
            f"{bl['profiled_compute_ms_per_request']:.2f} ms per request as profiled")


def serve_ray_row(sr: dict[str, Any]) -> tuple[str, str, str]:
    """memadapt on Ray Serve against Serve's multiplexing LRU at its best count."""
    m = sr["meta"]
    ma = next(s for s in sr["systems"] if s["system"] == "memadapt")
    bl = next(s for s in sr["systems"] if s["system"] == sr["best_baseline"])
    worse = [w for w, bad in (("p99", ma["latency_p99_s"] > bl["latency_p99_s"]),
                              ("p50", ma["latency_p50_s"] > bl["latency_p50_s"]),
                              ("throughput", ma["throughput_rps"] < bl["throughput_rps"]),
                              ("peak RSS", ma["rss_peak_per_replica_bytes"]
                               > bl["rss_peak_per_replica_bytes"]),
                              ("misses", ma["miss_rate"] > bl["miss_rate"])) if bad]
    # where any K beats memadapt on misses or p50, and what memory it took for that
    beats = [f"K={s['k']} {what} ({_mib(s['rss_peak_per_replica_bytes'])} MiB per replica)"
             for s in sr["systems"] if "k" in s for what, yes in (
                 (f"misses {s['miss_rate']:.3f}", s["miss_rate"] < ma["miss_rate"]),
                 (f"p50 {s['latency_p50_s'] * 1e3:.0f} ms",
                  s["latency_p50_s"] < ma["latency_p50_s"])) if yes]
    ks = ", ".join(str(s["k"]) for s in sr["systems"] if "k" in s)
    return (f"`memadapt serve --ray --replicas 2` vs Serve's `@serve.multiplexed` LRU over "
            f"onnxruntime sessions (K tried: {ks}; best at the same memory K={bl['k']}), "
            f"{m['requests']:,} requests of a {m['models']}-model Azure trace, "
            f"{m['total_budget_bytes'] / 2**20:.0f} MiB in all",
            f"miss rate {ma['miss_rate']:.3f} vs {bl['miss_rate']:.3f}, p99 "
            f"{ma['latency_p99_s'] * 1e3:.0f} vs {bl['latency_p99_s'] * 1e3:.0f} ms, "
            f"{ma['throughput_rps']:.0f} vs {bl['throughput_rps']:.0f} req/s, peak RSS per "
            f"replica {_mib(ma['rss_peak_per_replica_bytes'])} vs "
            f"{_mib(bl['rss_peak_per_replica_bytes'])} MiB, failed {ma['failed']} vs "
            f"{bl['failed']}; memadapt's replicas within budget: "
            f"{'yes' if ma['within_budget'] else 'NO'} (their charge, polled; measured RSS "
            f"growth at most {_mib(ma['rss_peak_over_idle_bytes'])} of "
            f"{_mib(m['per_replica_budget_bytes'])} MiB)"
            + (f"; memadapt worse on {', '.join(worse)}: {_why(ma, bl)}" if worse else "")
            + (f"; beaten by {', '.join(beats)}" if beats else "")
            + f"; memadapt loses fidelity: {1 - ma['served_by_base_variant']:.0%} of its "
            f"requests ran an int8 variant (it downgrades to fit more models), "
            f"{ma['profiled_compute_ms_per_request']:.2f} vs "
            f"{bl['profiled_compute_ms_per_request']:.2f} ms of compute per request as profiled",
            "`benchmarks/serve_ray.py` -> `serve_ray.json`")


def measured(results: Path) -> str:
    """The "Measured" table: one row per committed result file's main figures."""
    rows: list[tuple[str, str, str]] = []
    if (results / "demo.json").exists():
        dm = _load(results, "demo.json")
        mins, secs = divmod(round(dm["wall_s"]), 60)
        verdict = [ln.strip() for ln in dm["tail"] if ln.startswith("memadapt ")]
        rows.append(("`make demo` on a fresh clone, nothing installed (venv, train, 16 variants "
                     "with shortened recovery, profile, show, select, simulate)",
                     f"{mins} min {secs} s (exit {dm['returncode']}, {dm['cpus']} cores)"
                     + (f"; its verdict: \"{verdict[-1]}\"" if verdict else ""),
                     "`benchmarks/demo_time.py` -> `demo.json`"))
    rec = _load(results, "recovery.json")
    d = rec["digits_resnet18"]
    vs = " / ".join(v["variant"].removeprefix("resnet18+") for v in d["variants"])
    acc = " / ".join(f"{v['accuracy_after']:g}" for v in d["variants"])
    par = " / ".join(f"{v['params_ratio']:.0%}" for v in d["variants"])
    rows.append((f"ResNet-18 on digits (base accuracy {d['base_accuracy']:g} held out) after "
                 f"recovery: {vs}", f"{acc} accuracy at {par} of the parameters",
                 "`benchmarks/recovery.py` -> `recovery.json`"))
    m = rec["minilm"]
    rows.append(("MiniLM (real weights) after recovery, token cosine to the base on held-out "
                 "text", ", ".join(f"{v['variant'].removeprefix('minilm+')} "
                                   f"{v['fidelity_after']:.4f} ({v['params_ratio']:.0%} of the "
                                   f"parameters, {v['recover_steps']} steps)"
                                   for v in m["variants"]),
                 "`benchmarks/recovery.py` -> `recovery.json`"))
    prof = _load(results, "profile.json")
    peak = {(r["name"], r["batch"]): r["peak_memory_bytes"] for r in prof["rows"]
            if r.get("peak_memory_bytes")}
    shown = [n for n in ("resnet18", "resnet18+int8", "resnet18+prune0.5")
             if (n, 1) in peak and (n, 8) in peak]
    rows.append(("Peak memory at batch 1 / 8, MiB (ResNet-18, onnxruntime CPU, arena off)",
                 ", ".join(f"{n.removeprefix('resnet18+') if '+' in n else 'base'} "
                           f"{_mib(peak[(n, 1)])} / {_mib(peak[(n, 8)])}" for n in shown),
                 "`benchmarks/profile_bench.py` -> `profile.json`"))
    rows.append(("Same variant profiled three times (largest spread of the peak)",
                 f"{max(x['rel_spread'] for x in prof['repeatability']):.2%}",
                 "`profile.json` (`repeatability`)"))
    rows.append((f"Profiling {len(prof['profile_s_per_variant'])} ResNet-18 variants at batch "
                 f"{' and '.join(str(b) for b in prof['settings']['batches'])} "
                 f"({prof['settings']['runs']} runs)", f"{prof['profile_s']:.0f} s; memory "
                 f"model within {max(x['rel_error'] for x in prof['fit']):.1%}; `/usr/bin/time` "
                 f"cross-check within {max(x['rel_diff'] for x in prof['cross_check']):.1%}",
                 "`profile.json`"))
    sel = {k: v for k, v in _load(results, "select.json")["results"].items()
           if "exact_p99_ms" in v}
    ex = [v["exact_p99_ms"] for v in sel.values()]
    rows.append((f"`select`, {_load(results, 'select.json')['meta']['models']} models x "
                 f"{_load(results, 'select.json')['meta']['variants']} variants",
                 f"exact p99 {min(ex):.1f}-{max(ex):.1f} ms, fast p99 "
                 f"{max(v['fast_p99_ms'] for v in sel.values()):.1f} ms, fast mean gap "
                 f"{max(v['fast_gap_mean'] for v in sel.values()):.0e}",
                 "`benchmarks/select_bench.py` -> `select.json`"))
    ov = _load(results, "cache.json")["results"]["overhead"]
    rows.append(("`VariantCache.infer` overhead over a bare session run",
                 ", ".join(f"{o['model']} {o['overhead_us']:.0f} us" for o in ov),
                 "`benchmarks/cache_bench.py` -> `cache.json`"))
    sh = _load(results, "sharing.json")
    runs = sh["hosting"]["runs"]
    rows.append(("Two MiniLM task models in one `VariantCache`, `share_weights` on vs off",
                 f"{sh['hosting']['ratio_shared_over_separate']:.2f}x the RSS "
                 f"({runs['shared']['rss_delta_bytes'] / 1e6:.0f} vs "
                 f"{runs['separate']['rss_delta_bytes'] / 1e6:.0f} MB)",
                 "`benchmarks/sharing.py` -> `sharing.json`"))
    by: dict[str, list[float]] = {}
    for e in sh["exits"]:
        by.setdefault(e["model"], []).append(e["downgrade_ms"])
    rows.append(("In-place downgrade full -> exit@k (no file opened)",
                 ", ".join(f"{k} {min(v):.2f}-{max(v):.2f} ms" for k, v in by.items()),
                 "`sharing.json` (`exits`)"))
    o = sh.get("hosting_onnxruntime")
    if o:
        ro = o["runs"]
        via = ro["shared"].get("via", "VariantCache")
        rows.append(("Two MiniLM task models with `backend='onnxruntime'`, shared tensors "
                     f"({'one `VariantCache`' if via == 'VariantCache' else via}) vs apart",
                     f"{o['ratio_shared_over_separate']:.2f}x the RSS "
                     f"({ro['shared']['rss_delta_bytes'] / 1e6:.0f} vs "
                     f"{ro['separate']['rss_delta_bytes'] / 1e6:.0f} MB)",
                     "`sharing.json` (`hosting_onnxruntime`)"))
    if (results / "swaps.json").exists():
        sw = _load(results, "swaps.json")
        ms = 1e3
        for r in sw["rows"]:
            if r["model"] != "resnet50":
                continue
            rows.append((f"Bringing ResNet-50 ({r['bytes'] / 1e6:.0f} MB) back, load + first run "
                         f"- a steady run, median of {r['repeats']} (onnxruntime CPU)",
                         f"host tier {ms * r['host_reload_s']:.0f} ms, optimised graph from "
                         f"file {ms * r['optimized_file_s']:.0f} ms, plain ONNX file "
                         f"{ms * r['bare_file_s']:.0f} ms, memcpy of its bytes "
                         f"{ms * r['memcpy_s']:.0f} ms; torch from its host form "
                         f"{ms * r['torch_reload_s']:.0f} ms",
                         "`benchmarks/swaps.py` -> `swaps.json`"))
        for d in sw.get("downgrades", []):
            rows.append((f"Downgrade {d['full']} -> {d['variant']} through onnxruntime sessions "
                         f"sharing tensors ({d['bytes_read']} bytes read)",
                         f"session open {ms * d['open_s']:.1f} ms (min "
                         f"{ms * d['open_min_s']:.1f}), "
                         f"{d['freed_bytes'] / 1e6:.0f} MB freed",
                         "`swaps.json` (`downgrades`)"))
    if (results / "soak.json").exists():
        sk = _load(results, "soak.json")
        rows.append((f"Soak: {sk['clients']} clients on {len(sk['models'])} models for "
                     f"{sk['minutes']:g} min, budget moved {sk['budget_changes']} times "
                     f"between 30% and 120% of their base memory ({sk['policy']})",
                     f"{sk['requests']:,} requests, {sk['failed_requests']} failed, "
                     f"{sk['infeasible_requests']} InfeasibleBudget; worst RSS over budget + "
                     f"baseline {sk['max_rss_overshoot_fraction']:+.1%} of that sum "
                     f"({sk['max_rss_over_budget_fraction']:+.1%} of the budget alone) at "
                     f"{sk['max_rss_overshoot_at_s']:.0f} s",
                     "`benchmarks/soak.py` -> `soak.json`, `soak.md`"))
    if (results / "replay.json").exists():
        rp = _load(results, "replay.json")

        def metric(row: dict, name: str) -> dict:
            return next(m for m in row["metrics"] if m["name"] == name)

        rows.append((f"Real replay vs simulation, {rp['trace']['requests']:,} requests of a "
                     f"{rp['trace']['models']}-model Azure trace at {rp['budget']}: miss rate "
                     f"and mean latency, simulated / real",
                     "; ".join(f"{r['policy']} {metric(r, 'miss_rate')['simulated']:.4f} / "
                               f"{metric(r, 'miss_rate')['real']:.4f}, "
                               f"{metric(r, 'mean_latency_s')['simulated'] * 1e3:.1f} / "
                               f"{metric(r, 'mean_latency_s')['real'] * 1e3:.1f} ms"
                               for r in rp["policies"]),
                     "`benchmarks/replay_bench.py` -> `replay.json`"))
    lt = _load(results, "loadtest.json")
    rows.append((f"Load test: {lt['clients']} `tritonclient` clients for {lt['seconds']:.0f} s "
                 f"against `memadapt serve`, budget moved {lt['budget_changes']} times"
                 if not isinstance(lt.get("budget_changes"), list) else
                 f"Load test: {lt['clients']} `tritonclient` clients for {lt['seconds']:.0f} s "
                 f"against `memadapt serve`, budget moved {len(lt['budget_changes'])} times",
                 f"{lt['requests']:,} requests, {lt['failed']} failed, "
                 f"{lt['throughput_rps']:.0f} req/s, p99 {lt['latency_p99_s'] * 1e3:.0f} ms",
                 "`examples/loadtest.py` -> `loadtest.json`"))
    if (results / "serve_ray.json").exists():
        rows.append(serve_ray_row(_load(results, "serve_ray.json")))
    pol = _load(results, "policies.json")
    if pol.get("timing"):
        t0 = pol["timing"][0]
        rows.append((f"Simulator, {t0['requests']:,} requests over {t0['models']} models",
                     ", ".join(f"{t['policy']} {t['simulate_s']:.1f} s" for t in pol["timing"]),
                     "`benchmarks/policies.py` -> `policies.json` (`timing`)"))
    out = ["| what | figure | source |", "| --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out) + "\n"


BLOCKS: dict[str, Callable[[Path], str]] = {"headline": headline, "measured": measured}
_BLOCK = re.compile(r"(<!-- BEGIN (\w+) -->\n)(.*?)(<!-- END \2 -->)", re.S)


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` (the README) with every generated block rendered from ``results``."""

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise SystemExit(f"README block {name!r} has no renderer; known: {sorted(BLOCKS)}")
        return m.group(1) + BLOCKS[name](results) + m.group(4)

    return _BLOCK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    path = Path(args.readme)
    text = path.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{path} differs from benchmarks/results: run python benchmarks/readme.py",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
