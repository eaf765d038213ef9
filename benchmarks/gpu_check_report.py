"""The GPU check's report: the catalog's profiles, the targets, JSON and markdown.

Reads only JSON and the store's SQLite catalog (through ``profiler.load_profiles``), so
the parent process never imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpu_check_plan import FP16_RATIO, PEAK_TOLERANCE, SWAP_TOLERANCE, UPGRADE_FRACTION, MiB


def profile_rows(store_root: Path, device: str, backends) -> list[dict[str, Any]]:
    """``profiler.report.rows`` (what ``memadapt show --json`` prints) of every profiled
    (variant, backend, batch) of the check's store on this device type."""
    import profiler
    from profiler.report import rows

    dtype = "cuda" if device.startswith("cuda") else "cpu"
    out = []
    for backend in backends:
        try:
            out += rows(profiler.load_profiles(store_root, device=dtype, backend=backend))
        except Exception as e:  # noqa: BLE001 - no catalog yet: nothing profiled
            out.append({"backend": backend, "error": f"{type(e).__name__}: {e}"})
    return out


def _step(report: dict, name: str) -> dict:
    return report["steps"].get(name) or {}


def finalize(report: dict) -> None:
    """The targets, from what the steps measured."""
    cpu = not report["plan"]["device"].startswith("cuda")
    note = "cpu-smoke: CPU stand-ins, not a GPU result" if cpu else None
    targets: dict[str, Any] = {}

    sizes = {(v["model"], v["kind"]): v["onnx_bytes"]
             for v in _step(report, "generate").get("variants", [])}
    fp16 = {m: round(sizes[(m, "fp16")] / sizes[(m, "fp32")], 3)
            for m, k in sizes if k == "fp32" and sizes.get((m, "fp16"))}
    targets["fp16_half_weights"] = {
        "target": f"fp16 variant's ONNX / fp32's in [{FP16_RATIO[0]}, {FP16_RATIO[1]}]",
        "met": all(FP16_RATIO[0] <= x <= FP16_RATIO[1] for x in fp16.values()) if fp16
        else None, "values": fp16}

    downs = [d for d in _step(report, "downgrade").get("models", []) if d.get("status") == "ok"]
    copy = _step(report, "bandwidth").get("gbps")
    fractions = {d["model"]: round(d["upgrade_gbps"] / copy, 3) for d in downs
                 if copy and d.get("upgrade_gbps")}
    targets["upgrade_vs_copy_floor"] = {
        "target": f"in-place upgrade's tail (file -> device) at >= {UPGRADE_FRACTION:.0%} of "
                  f"the copy bandwidth ({'pinned H2D' if not cpu else 'memcpy'})",
        "met": None if cpu or not fractions else all(f >= UPGRADE_FRACTION
                                                     for f in fractions.values()),
        "values": fractions, "note": note}

    profiled = {(r["name"], r["batch"]): r for r in report.get("profiles", [])
                if r.get("backend") == "torch" and r.get("status") == "ok"}
    ratios = []
    for d in downs:
        for p in d.get("peaks", []):
            ref = (p.get("max_memory_allocated") or 0) + (p.get("outside_allocator") or 0)
            row = profiled.get((d["full"], p["batch"]))
            if ref and row and row.get("peak_memory_bytes"):
                ratios.append({"what": d["full"], "batch": p["batch"],
                               "ratio": round(row["peak_memory_bytes"] / ref, 3)})
    targets["profiler_peak_vs_allocator"] = {
        "target": f"profiler peak / (max_memory_allocated + context) within "
                  f"{PEAK_TOLERANCE:.0%} of 1",
        "met": all(abs(r["ratio"] - 1) <= PEAK_TOLERANCE for r in ratios) if ratios else None,
        "values": ratios, "note": "no GPU memory on the CPU" if cpu else None}

    diffs = [(f"{d['model']} exit (downgrade)", d["exit_max_rel_diff"]) for d in downs]
    diffs += [(f"{d['model']} full (upgrade)", d["upgrade_max_rel_diff"]) for d in downs]
    serve = _step(report, "serve")
    for ph in serve.get("phases", []):
        diffs += [(f"{s['variant']} ({ph['phase']})", s["max_rel_diff"]) for s in ph["served"]]
    worst = max(diffs, key=lambda t: t[1]) if diffs else None
    targets["swaps_reproduce_outputs"] = {
        "target": f"every swapped-in model answers like the stored variant's own session "
                  f"(max relative difference <= {SWAP_TOLERANCE:g})",
        "met": worst[1] <= SWAP_TOLERANCE if worst else None,
        "worst": {"what": worst[0], "max_rel_diff": worst[1]} if worst else None}

    phases = serve.get("phases", [])
    tight = next((p for p in phases if p["phase"] == "tight"), None)
    roomy = next((p for p in phases if p["phase"] == "roomy"), None)
    # the variants the roomy phase chose may already be the smallest (which is best comes
    # from measured memory and fidelity): the tight phase must step down only if it moved
    # away from them; upgrades with room again are reported, not required (they follow the
    # cache's re-plan, which one request per model may not reach)
    moved = bool(tight and roomy) and (
        {s["model"]: s["variant"] for s in tight["served"]}
        != {s["model"]: s["variant"] for s in roomy["served"]})
    targets["cache_follows_budget"] = {
        "target": "under the tight budget the cache holds at most the budget, serves every "
                  "model and, where it serves other variants than with room, got there by "
                  "swaps or evictions it counted (a model first served at its fastest "
                  "variant may finish an upgrade that still fits)",
        "met": None if not tight else (
            tight["bytes_resident"] <= tight["budget_bytes"]
            and all(s["variant"] for s in tight["served"])
            and (not moved or tight["downgrades"] + tight["upgrades"]
                 + tight["evictions"] > 0)),
        "upgrades_with_room_again": phases[-1]["upgrades"] if phases else None,
        "phases": [{k: p[k] for k in ("phase", "budget_bytes", "bytes_resident",
                                      "downgrades", "upgrades")} for p in phases]}
    report["targets"] = targets


def write(report: dict, paths: tuple[Path, Path]) -> None:
    for path, text in ((paths[0], json.dumps(report, indent=2, default=str) + "\n"),
                       (paths[1], markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.2f}"


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def _num(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _section(title: str, columns: str) -> list[str]:
    """A markdown heading and table header; ``columns`` split by ``|``, a trailing ``>``
    right-aligns one."""
    cols = [c.strip() for c in columns.split("|")]
    head = " | ".join(c.rstrip(">").strip() for c in cols)
    rule = " | ".join("---:" if c.endswith(">") else "---" for c in cols)
    return ["", f"## {title}", "", f"| {head} |", f"| {rule} |"]


def _met(m) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[m]


def summary_lines(report: dict) -> list[str]:
    steps = ", ".join(f"{k} {v.get('status')}" for k, v in report["steps"].items())
    lines = [f"device: {report['device'].get('name') or report['plan']['device']} (mode "
             f"{report['mode']}, {report['elapsed_s']} s of {report['budget_s']} s"
             f"{', stopped early' if report['stopped_early'] else ''})", f"steps: {steps}"]
    for name, t in report["targets"].items():
        lines.append(f"{name}: {_met(t['met'])}")
    return lines


def markdown(report: dict) -> str:
    d = report["device"]
    v = report["versions"]
    out = [f"# GPU check {report['date']} ({report['mode']})", "",
           f"Device: **{d.get('name') or report['plan']['device']}**, driver "
           f"{d.get('driver', '-')}, CUDA (torch) {d.get('torch_cuda', '-')}; torch "
           f"{v.get('torch', '-')}, onnxruntime {v.get('onnxruntime-gpu') or v.get('onnxruntime')}"
           f" (providers: {', '.join(report['onnxruntime_providers']) or 'none'}); GPU memory "
           f"from {d.get('memory_method') or '-'}, CUDA context {_mib(d.get('context_bytes'))} "
           f"MiB.", "",
           f"Ran {report['elapsed_s']} s of a {report['budget_s']} s budget"
           f"{' (stopped early: see Skipped)' if report['stopped_early'] else ''}. Every "
           f"number comes from memadapt's own code: `variants.generate`, `profiler.profile`, "
           f"`VariantCache`, `variants.shared.downgrade_in_place`; written by "
           f"`benchmarks/gpu_check.py` (see `benchmarks/GPU.md`).", ""]
    if report["mode"] == "cpu-smoke":
        out += ["> cpu-smoke: tiny models on the CPU; the numbers only show the flow works.", ""]
    out += ["## Targets", "", "| target | result | detail |", "| --- | --- | --- |"]
    for name, t in report["targets"].items():
        detail = t.get("values") or t.get("worst") or t.get("phases") or t.get("note") or ""
        out.append(f"| {name}: {t.get('target', '')} | {_met(t['met'])} | "
                   f"{json.dumps(detail, default=str)[:300]} |")
    gen = _step(report, "generate")
    out += _section("Variants (`variants.generate`)",
                    "model | kind | variant | params> | ONNX MiB> | weights MiB>")
    for x in gen.get("variants", []):
        out.append(f"| {x['model']} | {x['kind']} | {x['name']} | {x['params']:,} | "
                   f"{_mib(x['onnx_bytes'])} | {_mib(x['weights_bytes'])} |")
    bw = _step(report, "bandwidth")
    out += ["", "## Copy bandwidth (`profiler.gpu.copy_bandwidth`)", ""]
    out.append(f"{_mib(bw.get('nbytes'))} MiB, best of {bw.get('reps')}, {bw.get('method')}: "
               f"**{_num(bw.get('gbps'), '{:.2f}')} GB/s** (pageable "
               f"{_num(bw.get('pageable_gbps'), '{:.2f}')} GB/s)." if bw.get("status") == "ok"
               else f"not measured: {bw.get('status', 'skipped')} {bw.get('error', '')}")
    out += _section("Profiles (`profiler.profile`)",
                    "variant | backend | batch> | status | peak MiB> | static MiB> | p50 ms> | "
                    "p99 ms> | cold load s> | fidelity>")
    for r in report.get("profiles", []):
        if "name" not in r:
            out.append(f"| - | {r['backend']} | - | {r.get('error')} | | | | | | |")
            continue
        out.append(f"| {r['name']} | {r['backend']} | {r['batch']} | {r['status']} | "
                   f"{_mib(r['peak_memory_bytes'])} | {_mib(r['static_memory_bytes'])} | "
                   f"{_ms(r['latency_p50_s'])} | {_ms(r['latency_p99_s'])} | "
                   f"{_num(r['load_cold_s'])} | "
                   f"{_num(r['fidelity'])} |")
    downs = _step(report, "downgrade").get("models", [])
    out += _section("In-place downgrade and upgrade (`variants.shared`)",
                    "model | drop ms> | freed MiB (allocator) | exit first run ms> | "
                    "tail MiB> | upgrade ms> | upgrade GB/s> | exit / full rel diff")
    for x in downs:
        if x.get("status") != "ok":
            out.append(f"| {x['model']} | {x.get('status')} {x.get('error', '')} | | | | | | |")
            continue
        out.append(f"| {x['model']} | {_ms(x['drop_s'])} | {_mib(x['freed_bytes'])} "
                   f"({_mib(x['freed_allocated_bytes'])}) | {_ms(x['exit_first_infer_s'])} | "
                   f"{_mib(x['tail_bytes'])} | {_ms(x['upgrade_s'])} | "
                   f"{_num(x['upgrade_gbps'], '{:.2f}')} | {x['exit_max_rel_diff']:.1e} / "
                   f"{x['upgrade_max_rel_diff']:.1e} |")
    serve = _step(report, "serve")
    out += _section("Serving (`VariantCache`)",
                    "phase | budget MiB> | resident MiB> | served | downgrades> | upgrades> | "
                    "cold loads>")
    for ph in serve.get("phases", []):
        served = ", ".join(f"{s['variant']}{' (cold)' if s['cold'] else ''}"
                           for s in ph["served"])
        out.append(f"| {ph['phase']} | {_mib(ph['budget_bytes'])} | "
                   f"{_mib(ph['bytes_resident'])} | {served} | {ph['downgrades']} | "
                   f"{ph['upgrades']} | {ph['cold_loads']} |")
    out += ["", "## Skipped and failed", ""]
    if report.get("missing"):
        out.append(f"- modules the library needs but this Python lacks: "
                   f"{', '.join(report['missing'])}")
    for s in report["skipped"]:
        out.append(f"- {s['what']}: {s['reason']}")
    for name, r in report["steps"].items():
        if r.get("status") not in ("ok",):
            out.append(f"- {name}: {r.get('status')} {r.get('error', '')}")
    for x in downs:
        if x.get("status") != "ok":
            out.append(f"- downgrade {x['model']}: {x.get('status')} {x.get('error', '')}")
    return "\n".join(out) + "\n"
