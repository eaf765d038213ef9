"""GPU path check: memory, latency and swap costs of real variants on one CUDA device.

One prepared script for a short device lease (under 5 minutes on one H200). It profiles a
ResNet-50 (torchvision, random weights, 224x224) and a BERT-base-sized encoder
(transformers ``BertModel`` from config: 12 layers, hidden 768, 12 heads, seq 128) as four
variants each: ``fp32``, ``fp16`` (``.half()``), ``prune0.5`` and ``exit`` (ResNet cut after
layer2 with an avgpool + linear head; BERT's first 6 layers), with the torch backend on
``cuda:0`` at batch 1, 8, 32 and 128, and measures in priority order:

1. pinned host->GPU copy bandwidth (256 MiB, ``.to('cuda', non_blocking=True)``, best of N):
   the physical limit of an upgrade from host memory;
2. per variant, in a fresh child process (``--child``, JSON on stdout) so variants don't share
   allocator or library state: latency p50/p95/p99, ``max_memory_allocated`` after
   ``reset_peak_memory_stats``, the process's GPU memory (NVML; else ``nvidia-smi``; else
   ``torch.cuda.mem_get_info``), the CUDA context, and memadapt's profiler peak
   (``profiler.memory.CudaMeter``: allocator peak + what the allocator does not own) against
   ``max_memory_allocated`` + context;
3. per variant, every swap kind: cold from disk (file -> construct -> load -> GPU -> first
   inference, page cache dropped), from the host tier (weights already in pinned host memory:
   per-tensor copies, one flat copy, one flat copy into a preallocated buffer -> first
   inference) and, for the exit variant, the in-place downgrade of the resident full model
   (drop the tail, serve prefix + exit head) and the upgrade back (copy only the tail's bytes);
4. the same variants through onnxruntime's CUDA execution provider at batch 1 and 32, when
   the installed onnxruntime has it.

A global time guard (``--budget-s``, default 270) stops cleanly, writing what it has: results
are rewritten after every child. Targets: host-tier upgrade >= 70% of pinned bandwidth; fp16
weights about half of fp32; profiler peak within 10% of ``max_memory_allocated`` + context.

memadapt's modules are used where they import (``profiler.memory``, ``profiler.latency``,
``variants.prune``); each falls back to code in this file, and every missing optional module
(safetensors, torch_pruning, pynvml, click, rich, ...) is recorded in the results.

Run (repo root):
    PYTHONPATH=. python benchmarks/gpu_check.py                 # results/gpu-<date>.{json,md}
    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR --quick
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpusmoke   # no GPU needed
``benchmarks/GPU.md`` says how to run it on the device machine and what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.gpu_check")

SCHEMA = 1
MiB = 1 << 20
RESULT_MARK = "GPU_CHECK_RESULT "
MODELS = ("resnet", "bert")
VARIANTS = ("fp32", "fp16", "exit", "prune0.5")  # priority order after fp32
PRUNE_RATIO = 0.5
#: targets the issue sets
UPGRADE_FRACTION = 0.70
FP16_RATIO = (0.45, 0.55)
PEAK_TOLERANCE = 0.10
#: a swapped-in model must answer like the resident one (fp16 kernels may differ slightly)
SWAP_TOLERANCE = 1e-2
#: seconds a child needs at least (imports, CUDA start, model build) before it is worth starting
MIN_CHILD_S = {"bandwidth": 10.0, "torch": 20.0, "ort": 40.0}
#: the child's deadline is this much before the parent's, so the parent can still write
CHILD_MARGIN_S = 4.0

# Modules whose absence changes what is measured; recorded, never required (except torch).
OPTIONAL = ("torch", "torchvision", "transformers", "numpy", "onnx", "onnxscript", "onnxruntime",
            "safetensors", "torch_pruning", "pynvml", "psutil", "click", "rich",
            "variants", "profiler")
DISTRIBUTIONS = ("torch", "torchvision", "transformers", "numpy", "onnx", "onnxscript",
                 "onnxruntime", "onnxruntime-gpu", "safetensors", "torch-pruning",
                 "nvidia-ml-py", "pynvml", "psutil", "click", "rich")


# ---- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one run measures; the child gets it as JSON."""

    mode: str  # "full", "quick" or "cpu-smoke"
    device: str  # "cuda:0" or "cpu"
    resnet: str  # torchvision constructor
    resolution: int
    bert_name: str
    bert: tuple[int, int, int, int]  # layers, hidden, heads, FFN width
    vocab: int
    seq_len: int
    batches: tuple[int, ...]
    ort_batches: tuple[int, ...]
    ort_variants: tuple[str, ...]
    ort_models: tuple[str, ...]
    warmup: int
    runs: int
    cold_reps: int
    host_reps: int
    bandwidth_mib: int
    bandwidth_reps: int
    isolate: str  # "variant", "model" or "run": what one child process measures
    threads: int | None
    #: dtype of the "fp16" variant: float16 (``.half()``); the CPU smoke run uses bfloat16,
    #: since CPU float16 convolutions take a slow path (20x bf16) that the smoke can't afford
    half: str = "float16"

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**{f.name: tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
                      for f in fields(cls)})

    def name(self, model: str) -> str:
        return self.resnet if model == "resnet" else self.bert_name

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def make_plan(args: argparse.Namespace) -> Plan:
    if args.cpu_smoke:
        return Plan(mode="cpu-smoke", device="cpu", resnet="resnet18", resolution=64,
                    bert_name="bert-2layer", bert=(2, 128, 2, 512), vocab=30522, seq_len=16,
                    batches=(1, 2), ort_batches=(1,), ort_variants=("fp32",),
                    ort_models=("bert",), warmup=1, runs=2,
                    cold_reps=1, host_reps=1, bandwidth_mib=16, bandwidth_reps=2,
                    isolate=args.isolate or "run", threads=1, half="bfloat16")
    quick = bool(args.quick)
    return Plan(mode="quick" if quick else "full", device=args.device, resnet="resnet50",
                resolution=224, bert_name="bert-base", bert=(12, 768, 12, 3072), vocab=30522,
                seq_len=128, batches=(1, 8, 32, 128), ort_batches=(1, 32),
                ort_variants=VARIANTS, ort_models=MODELS, warmup=3 if quick else 5,
                runs=10 if quick else 30,
                cold_reps=1 if quick else 2, host_reps=2 if quick else 3, bandwidth_mib=256,
                bandwidth_reps=5 if quick else 10, isolate=args.isolate or "variant",
                threads=None)


def plan_jobs(plan: Plan, ort_cuda: bool) -> tuple[list[dict], list[dict]]:
    """Jobs in priority order, and what is skipped before anything runs (with why)."""
    jobs: list[dict] = [{"kind": "bandwidth"}]
    for v in VARIANTS:
        for m in MODELS:
            jobs.append({"kind": "torch", "model": m, "variant": v})
    skipped = []
    if plan.cuda and not ort_cuda:
        skipped.append({"what": "onnxruntime CUDA EP (all variants)",
                        "reason": "the installed onnxruntime has no CUDAExecutionProvider "
                                  "(needs onnxruntime-gpu)"})
    else:
        for v in plan.ort_variants:
            for m in plan.ort_models:
                jobs.append({"kind": "ort", "model": m, "variant": v})
    return jobs, skipped


def group_jobs(jobs: list[dict], isolate: str) -> list[list[dict]]:
    """Which jobs share a child process: one each, one per (kind, model), or all in one."""
    if isolate == "run":
        return [jobs]
    if isolate == "variant":
        return [[j] for j in jobs]
    groups: dict[tuple, list[dict]] = {}
    for j in jobs:
        groups.setdefault((j["kind"], j.get("model")), []).append(j)
    return list(groups.values())


# ---- the environment, read without importing torch (the parent never touches the GPU) ------

def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _find(module: str) -> str:
    try:
        return "found" if importlib.util.find_spec(module) else "missing"
    except (ImportError, ValueError) as e:
        return f"missing: {e}"


def probe_env(plan: Plan) -> dict[str, Any]:
    imports = {m: _find(m) for m in OPTIONAL}
    versions = {d: v for d in DISTRIBUTIONS if (v := _version(d))}
    versions["python"] = sys.version.split()[0]
    providers: list[str] = []
    if imports["onnxruntime"] == "found":
        try:
            import onnxruntime as ort  # lists compiled-in providers; starts no CUDA context

            providers = list(ort.get_available_providers())
            versions["onnxruntime (module)"] = ort.__version__
        except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash
            imports["onnxruntime"] = f"broken: {type(e).__name__}: {e}"
    device: dict[str, Any] = {"requested": plan.device}
    smi = shutil.which("nvidia-smi")
    if plan.cuda and smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader", "-i", plan.device.partition(":")[2]
                                  or "0"], capture_output=True, text=True, timeout=30).stdout
            name, driver, total = (s.strip() for s in (out.strip().split(",") + ["", ""])[:3])
            device.update({"name": name, "driver": driver, "memory_total": total})
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            device["nvidia_smi_error"] = str(e)
    elif plan.cuda:
        device["nvidia_smi_error"] = "nvidia-smi not on PATH"
    return {"imports": imports, "versions": versions, "onnxruntime_providers": providers,
            "device": device}


# ---- the parent: run children in priority order under the time guard ------------------------

def run_child(group: list[dict], plan: Plan, workdir: str, deadline: float) -> dict[str, Any]:
    """One child process over ``group``; its JSON, or an error result per job."""
    spec = {"plan": asdict(plan), "jobs": group, "deadline": deadline - CHILD_MARGIN_S,
            "workdir": workdir}
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    if plan.threads:
        env["OMP_NUM_THREADS"] = str(plan.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    timeout = max(1.0, deadline - time.time())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=env)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"results": [{**j, "status": "timeout", "error": f"child killed after "
                             f"{timeout:.0f} s (time budget)", "stderr_tail": tail}
                            for j in group]}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return {"results": [{**j, "status": "error", "error": f"child exited {proc.returncode} "
                         f"without a result", "stderr_tail": proc.stderr[-1500:]}
                        for j in group]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    plan = make_plan(args)
    t_start = time.time()
    deadline = t_start + args.budget_s
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "gpu-check-smoke" if plan.mode == "cpu-smoke" else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = probe_env(plan)
    ort_cuda = "CUDAExecutionProvider" in env["onnxruntime_providers"]
    jobs, skipped = plan_jobs(plan, ort_cuda)
    report: dict[str, Any] = {
        "schema": SCHEMA, "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "mode": plan.mode,
        "budget_s": args.budget_s, "elapsed_s": 0.0, "stopped_early": False,
        "device": env["device"], "versions": env["versions"], "imports": env["imports"],
        "onnxruntime_providers": env["onnxruntime_providers"], "plan": asdict(plan),
        "bandwidth": None, "variants": [], "onnxruntime": [], "skipped": skipped,
        "targets": {},
    }
    stem = f"gpu-{report['date']}"
    paths = (out_dir / f"{stem}.json", out_dir / f"{stem}.md")
    no_cuda = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for group in group_jobs(jobs, plan.isolate):
            left = deadline - time.time()
            need = 3.0 if plan.mode == "cpu-smoke" else max(MIN_CHILD_S[j["kind"]] for j in group)
            if no_cuda or left < need + CHILD_MARGIN_S:
                why = ("no CUDA device (an earlier child found none)" if no_cuda else
                       f"time budget: {left:.0f} s left, a child needs about {need:.0f} s")
                report["stopped_early"] = report["stopped_early"] or not no_cuda
                report["skipped"] += [{"what": job_label(plan, j), "reason": why} for j in group]
                continue
            out = run_child(group, plan, workdir, deadline)
            merge(report, out, plan)
            for r in out["results"]:
                log.info("[%6.1fs] %-32s %s%s", time.time() - t_start, job_label(plan, r),
                         r.get("status"), f": {r['error']}" if r.get("error") else "")
            no_cuda = plan.cuda and (out.get("env") or {}).get("cuda_available") is False
            report["elapsed_s"] = round(time.time() - t_start, 1)
            finalize(report)
            write(report, paths)
    report["elapsed_s"] = round(time.time() - t_start, 1)
    finalize(report)
    write(report, paths)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {paths[0]} and {paths[1]}")
    bad = [r for r in report["variants"] + report["onnxruntime"] if r.get("status") == "error"]
    if (report["bandwidth"] or {}).get("status") == "error":
        bad.append(report["bandwidth"])
    return 2 if no_cuda else (1 if bad else 0)


def job_label(plan: Plan, job: dict) -> str:
    if job["kind"] == "bandwidth":
        return "bandwidth"
    return f"{plan.name(job['model'])} {job['variant']} ({job['kind']})"


def merge(report: dict, out: dict, plan: Plan) -> None:
    env = out.get("env") or {}
    for k, v in env.items():
        if k.startswith("device_") and v is not None:
            report["device"][k[len("device_"):]] = v
    for k in ("cuda_available", "torch_cuda", "memory_method", "tf32_matmul", "tf32_cudnn",
              "cudameter_error"):
        if env.get(k) is not None:
            report["device"][k] = env[k]
    for k in ("context_bytes", "context_warm_bytes"):  # the largest any child saw
        if env.get(k) is not None:
            report["device"][k] = max(env[k], report["device"].get(k) or 0)
    for name, status in (out.get("imports") or {}).items():
        if status != "ok" or report["imports"].get(name) in (None, "found"):
            report["imports"][name] = status
    for r in out["results"]:
        r = {**r, "label": job_label(plan, r)}
        if r["kind"] == "bandwidth":
            r.setdefault("env", env)
            report["bandwidth"] = r
        elif r["kind"] == "torch":
            report["variants"].append(r)
        else:
            report["onnxruntime"].append(r)
        for what, reason in r.get("skipped_parts", {}).items():
            report["skipped"].append({"what": f"{r['label']}: {what}", "reason": reason})


# ---- targets and output --------------------------------------------------------------------

def _host_fraction(entry: dict | None, pinned: float | None) -> dict | None:
    """Add ``fraction_of_pinned`` to every method of a host-tier measurement; the best one."""
    if not entry or not pinned:
        return None
    best = None
    for method, m in entry.get("methods", {}).items():
        if m.get("gbps"):
            m["fraction_of_pinned"] = round(m["gbps"] / pinned, 3)
            if best is None or m["fraction_of_pinned"] > best["fraction_of_pinned"]:
                best = {"method": method, **m}
    entry["best"] = best
    return best


def _range(xs: list) -> list | None:
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def _swap_diffs(swaps: dict) -> list[float]:
    out = [(swaps.get("cold") or {}).get("max_rel_diff"),
           (swaps.get("downgrade") or {}).get("upgrade_max_rel_diff")]
    out += [m.get("max_rel_diff") for m in (swaps.get("host") or {}).get("methods",
                                                                        {}).values()]
    return [d for d in out if d is not None]


def finalize(report: dict) -> None:
    """Fractions of pinned bandwidth, cold/host ratios and the three targets."""
    bw = report.get("bandwidth") or {}
    pinned = bw.get("pinned_h2d_gbps")
    cpu = report["mode"] == "cpu-smoke"
    fractions, ratios, peaks, diffs = [], [], [], []
    for r in report["variants"]:
        swaps = r.get("swaps") or {}
        diffs += [(r["label"], d) for d in _swap_diffs(swaps)]
        best = _host_fraction(swaps.get("host"), pinned)
        if best:
            fractions.append((r["label"], best["method"], best["fraction_of_pinned"]))
        cold = (swaps.get("cold") or {}).get("best_total_s")
        host_total = min((m["total_s"] for m in (swaps.get("host") or {}).get("methods",
                                                                                {}).values()
                          if m.get("total_s")), default=None)
        if cold and host_total:
            swaps["cold_over_host"] = round(cold / host_total, 2)
            ratios.append(swaps["cold_over_host"])
        down = swaps.get("downgrade") or {}
        best = _host_fraction(down.get("upgrade"), pinned)
        if best:
            fractions.append((r["label"] + " tail upgrade", best["method"],
                              best["fraction_of_pinned"]))
        for b in r.get("batches", []):
            if b.get("peak_ratio") is not None:
                peaks.append((r["label"], b["batch"], b["peak_ratio"],
                              b.get("peak_ratio_script"), b.get("peak_ratio_bare_context"),
                              b.get("profiler_peak_source")))
    targets: dict[str, Any] = {}
    note = "cpu-smoke: CPU stand-ins (memcpy for the copy), not a GPU result" if cpu else None
    if fractions:
        worst = min(fractions, key=lambda t: t[2])
        targets["host_upgrade_vs_pinned"] = {
            "target": f">= {UPGRADE_FRACTION:.0%} of pinned H2D bandwidth (best method per swap)",
            # a memcpy stands in for the copy on the CPU: the fractions mean nothing there
            "met": None if cpu else all(f >= UPGRADE_FRACTION for _, _, f in fractions),
            "worst": {"what": worst[0], "method": worst[1], "fraction": worst[2]},
            "values": [{"what": w, "method": m, "fraction": f} for w, m, f in fractions],
            "note": note}
    else:
        targets["host_upgrade_vs_pinned"] = {"met": None, "note": "not measured"}
    fp16 = []
    for model in MODELS:
        w = {r["variant"]: r.get("weights_bytes") for r in report["variants"]
             if r.get("model") == model and r.get("status") in ("ok", "partial")}
        if w.get("fp32") and w.get("fp16"):
            fp16.append((model, round(w["fp16"] / w["fp32"], 3)))
    targets["fp16_half_weights"] = {
        "target": f"fp16 weights / fp32 weights in [{FP16_RATIO[0]}, {FP16_RATIO[1]}]",
        "met": all(FP16_RATIO[0] <= x <= FP16_RATIO[1] for _, x in fp16) if fp16 else None,
        "values": dict(fp16), "note": note}
    if peaks:
        worst = max(peaks, key=lambda p: abs(p[2] - 1))
        targets["profiler_peak_vs_allocator"] = {
            "target": f"profiler peak / (max_memory_allocated + context) within "
                      f"{PEAK_TOLERANCE:.0%} of 1",
            "met": all(abs(p[2] - 1) <= PEAK_TOLERANCE for p in peaks),
            "min": min(p[2] for p in peaks), "max": max(p[2] for p in peaks),
            "worst": {"what": worst[0], "batch": worst[1], "ratio": worst[2]},
            "source": ", ".join(sorted({str(p[5]) for p in peaks})),
            # the same with this script's NVML reading, and against the bare context
            "script_range": _range([p[3] for p in peaks]),
            "bare_context_range": _range([p[4] for p in peaks])}
    else:
        targets["profiler_peak_vs_allocator"] = {
            "met": None, "note": "no GPU memory on cpu" if cpu else "not measured"}
    worst = max(diffs, key=lambda t: t[1]) if diffs else None
    targets["swaps_reproduce_outputs"] = {
        "target": f"sanity check: every swapped-in model answers like the resident one "
                  f"(max relative difference <= {SWAP_TOLERANCE:g})",
        "met": worst[1] <= SWAP_TOLERANCE if worst else None,
        "worst": {"what": worst[0], "max_rel_diff": worst[1]} if worst else None}
    targets["cold_over_host"] = {"values": ratios,
                                 "min": min(ratios) if ratios else None,
                                 "max": max(ratios) if ratios else None}
    report["targets"] = targets


def write(report: dict, paths: tuple[Path, Path]) -> None:
    for path, text in ((paths[0], json.dumps(report, indent=2, default=str) + "\n"),
                       (paths[1], markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pair(r) -> str:
    return "-" if not r else f"{r[0]:.3f}..{r[1]:.3f}"


def _met(m) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[m]


def summary_lines(report: dict) -> list[str]:
    t = report["targets"]
    bw = report.get("bandwidth") or {}
    lines = [f"device: {report['device'].get('name') or report['device']['requested']} "
             f"(mode {report['mode']}, {report['elapsed_s']} s of {report['budget_s']} s"
             f"{', stopped early' if report['stopped_early'] else ''})",
             f"pinned H2D: {_num(bw.get('pinned_h2d_gbps'))} GB/s"]
    ok = sum(r.get("status") == "ok" for r in report["variants"])
    lines.append(f"torch variants ok: {ok}/{len(report['variants'])}; onnxruntime: "
                 f"{sum(r.get('status') == 'ok' for r in report['onnxruntime'])}/"
                 f"{len(report['onnxruntime'])}; skipped: {len(report['skipped'])}")
    w = t["host_upgrade_vs_pinned"].get("worst")
    lines.append(f"host-tier upgrade >= 70% pinned: {_met(t['host_upgrade_vs_pinned']['met'])}"
                 + (f" (worst {w['what']} {w['method']} {w['fraction']:.0%})" if w else ""))
    lines.append(f"fp16 ~ half of fp32 weights: {_met(t['fp16_half_weights']['met'])} "
                 f"{t['fp16_half_weights'].get('values')}")
    p = t["profiler_peak_vs_allocator"]
    lines.append(f"profiler peak within 10%: {_met(p['met'])}"
                 + (f" (ratios {_pair([p['min'], p['max']])})" if "min" in p else ""))
    c = t["cold_over_host"]
    if c["values"]:
        lines.append(f"cold-from-disk / host-tier: {c['min']}..{c['max']}x")
    return lines


def markdown(report: dict) -> str:
    d = report["device"]
    v = report["versions"]
    out = [f"# GPU check {report['date']} ({report['mode']})", "",
           f"Device: **{d.get('name') or d['requested']}**, driver {d.get('driver', '-')}, "
           f"CUDA (torch) {d.get('torch_cuda', '-')}; torch {v.get('torch', '-')}, "
           f"torchvision {v.get('torchvision', '-')}, transformers {v.get('transformers', '-')}, "
           f"onnxruntime {v.get('onnxruntime-gpu') or v.get('onnxruntime', '-')} "
           f"(providers: {', '.join(report['onnxruntime_providers']) or 'none'}); "
           f"GPU memory read with {d.get('memory_method') or '-'}; CUDA context "
           f"{_mib(d.get('context_bytes'))} MiB bare, up to {_mib(d.get('context_warm_bytes'))}"
           f" MiB with cuBLAS/cuDNN loaded.", "",
           f"Ran {report['elapsed_s']} s of a {report['budget_s']} s budget"
           f"{' (stopped early: see Skipped)' if report['stopped_early'] else ''}. "
           f"Generated by `benchmarks/gpu_check.py`; `benchmarks/GPU.md` explains each number.",
           ""]
    if report["mode"] == "cpu-smoke":
        out += ["> cpu-smoke: tiny models on the CPU; every number is a stand-in that only "
                "shows the flow works.", ""]
    t = report["targets"]
    out += ["## Targets", "", "| target | result | detail |", "| --- | --- | --- |"]
    h = t["host_upgrade_vs_pinned"]
    w = h.get("worst")
    out.append(f"| host-tier upgrade >= 70% of pinned bandwidth | {_met(h['met'])} | "
               + (f"worst: {w['what']} ({w['method']}) {w['fraction']:.0%}" if w else
                  h.get("note", "")) + " |")
    f = t["fp16_half_weights"]
    out.append(f"| fp16 weights ~ half of fp32 | {_met(f['met'])} | "
               + ", ".join(f"{k}: {x:.3f}" for k, x in (f.get("values") or {}).items()) + " |")
    p = t["profiler_peak_vs_allocator"]
    out.append(f"| profiler peak vs max_memory_allocated + context within 10% | {_met(p['met'])}"
               f" | " + (f"ratios {p['min']:.3f}..{p['max']:.3f} ({p['source']}; with this "
                         f"script's NVML reading {_pair(p.get('script_range'))}; against the "
                         f"bare context {_pair(p.get('bare_context_range'))})"
                         if p.get("min") is not None else p.get("note", "")) + " |")
    sw = t["swaps_reproduce_outputs"]
    out.append(f"| swapped-in models answer like the resident one (check) | {_met(sw['met'])} | "
               + (f"worst: {sw['worst']['what']} {sw['worst']['max_rel_diff']:.1e}"
                  if sw.get("worst") else "-") + " |")
    c = t["cold_over_host"]
    out.append("| cold-from-disk / host-tier (info) | - | "
               + (f"{c['min']}x..{c['max']}x" if c["values"] else "-") + " |")
    bw = report.get("bandwidth") or {}
    out += ["", "## Copy bandwidth", ""]
    if bw.get("status") == "ok":
        out += [f"{_mib(bw['bytes'])} MiB, best of {bw['reps']} ({bw['method']}): pinned H2D "
                f"**{_num(bw.get('pinned_h2d_gbps'))} GB/s** (`.to(non_blocking=True)`), "
                f"into a preallocated buffer {_num(bw.get('pinned_h2d_prealloc_gbps'))} GB/s, "
                f"pageable H2D {_num(bw.get('pageable_h2d_gbps'))} GB/s, pinned D2H "
                f"{_num(bw.get('pinned_d2h_gbps'))} GB/s."]
    else:
        out.append(f"not measured: {bw.get('status', 'skipped')} {bw.get('error', '')}")
    out += ["", "## Latency and GPU memory (torch)", "",
            "| model | variant | weights MiB | batch | p50 ms | p95 ms | p99 ms | samples/s | "
            "max_alloc MiB | process MiB | profiler peak MiB | alloc+context MiB | ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |"]
    for r in report["variants"]:
        if not r.get("batches"):
            out.append(f"| {r['label'].split()[0]} | {r['variant']} | "
                       f"{_mib(r.get('weights_bytes'))} | - | {r.get('status')} "
                       f"{r.get('error', '')} | | | | | | | | |")
        for b in r.get("batches", []):
            out.append(f"| {r['label'].split()[0]} | {r['variant']} | "
                       f"{_mib(r.get('weights_bytes'))} | {b['batch']} | {_ms(b.get('p50_s'))} | "
                       f"{_ms(b.get('p95_s'))} | {_ms(b.get('p99_s'))} | "
                       f"{_num(b.get('throughput'), '{:.0f}')} | "
                       f"{_mib(b.get('max_memory_allocated'))} | {_mib(b.get('process_bytes'))} | "
                       f"{_mib(b.get('profiler_peak'))} | {_mib(b.get('reference_peak'))} | "
                       f"{_num(b.get('peak_ratio'), '{:.3f}')} |")
    out += ["", "## Swaps", "",
            "Cold = file -> construct -> load_state_dict -> device -> first batch-1 inference "
            "(page cache dropped). Host = weights already in pinned host memory -> device -> "
            "first inference; GB/s over the copy alone, % of pinned H2D.", "",
            "| model | variant | bytes MiB | cold s (read/construct/load/to-dev/infer) | "
            "host per-tensor ms, GB/s, % | host flat ms, GB/s, % | flat prealloc ms, GB/s, % | "
            "cold/host | max rel diff |",
            "| --- | --- | ---: | --- | --- | --- | --- | ---: | ---: |"]
    for r in report["variants"]:
        s = r.get("swaps") or {}
        cold = s.get("cold") or {}
        br = cold.get("breakdown") or {}
        cold_txt = (f"{cold['best_total_s']:.3f} ({'/'.join(_num(br.get(k), '{:.3f}') for k in ('read_s', 'construct_s', 'load_s', 'to_device_s', 'first_infer_s'))})"  # noqa: E501
                    if cold.get("best_total_s") else "-")
        methods = (s.get("host") or {}).get("methods", {})
        cells = []
        for m in ("per_tensor", "flat", "flat_prealloc"):
            x = methods.get(m) or {}
            cells.append(f"{_ms(x.get('transfer_s'))} (total {_ms(x.get('total_s'))}), "
                         f"{_num(x.get('gbps'))}, {_num(x.get('fraction_of_pinned'), '{:.0%}')}"
                         if x else "-")
        out.append(f"| {r['label'].split()[0]} | {r['variant']} | {_mib(s.get('bytes'))} | "
                   f"{cold_txt} | {' | '.join(cells)} | {_num(s.get('cold_over_host'))} | "
                   f"{_num(max(_swap_diffs(s), default=None), '{:.1e}')} |")
    downs = [(r, r["swaps"]["downgrade"]) for r in report["variants"]
             if (r.get("swaps") or {}).get("downgrade")]
    if downs:
        out += ["", "## In-place downgrade of the resident full model to its exit variant", "",
                "| model | drop ms | empty_cache ms | freed alloc MiB | freed process MiB | "
                "first exit inference ms | tail MiB | upgrade copy ms (flat), GB/s, % | "
                "upgrade + first full inference ms |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r, dg in downs:
            up = (dg.get("upgrade") or {}).get("best") or {}
            out.append(f"| {r['label'].split()[0]} | {_ms(dg.get('drop_s'))} | "
                       f"{_ms(dg.get('free_s'))} | {_mib(dg.get('freed_allocated_bytes'))} | "
                       f"{_mib(dg.get('freed_process_bytes'))} | "
                       f"{_ms(dg.get('exit_first_infer_s'))} | {_mib(dg.get('tail_bytes'))} | "
                       f"{_ms(up.get('transfer_s'))} ({up.get('method', '-')}), "
                       f"{_num(up.get('gbps'))}, {_num(up.get('fraction_of_pinned'), '{:.0%}')}"
                       f" | {_ms(up.get('total_s'))} |")
    out += ["", "## onnxruntime", ""]
    if report["onnxruntime"]:
        out += ["| model | variant | status | provider | export s | session + first run s | "
                "batch | p50 ms | p99 ms | process MiB |",
                "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in report["onnxruntime"]:
            rows = r.get("batches") or [{}]
            for b in rows:
                out.append(f"| {r['label'].split()[0]} | {r['variant']} | {r.get('status')} | "
                           f"{r.get('provider', '-')} | {_num(r.get('export_s'))} | "
                           f"{_num(r.get('session_s'))} | {b.get('batch', '-')} | "
                           f"{_ms(b.get('p50_s'))} | {_ms(b.get('p99_s'))} | "
                           f"{_mib(b.get('process_bytes'))} |")
    else:
        out.append("not run (see Skipped).")
    out += ["", "## Skipped, missing and failed", ""]
    missing = {k: s for k, s in report["imports"].items() if s not in ("ok", "found")}
    out.append("Missing or broken imports: " + (", ".join(f"`{k}` ({s})" for k, s in
                                                          missing.items()) or "none") + ".")
    out.append("")
    for s in report["skipped"]:
        out.append(f"- {s['what']}: {s['reason']}")
    for r in report["variants"] + report["onnxruntime"]:
        if r.get("status") not in ("ok",):
            out.append(f"- {r['label']}: {r.get('status')} {r.get('error', '')}")
    return "\n".join(out) + "\n"


# ==== the child: everything below runs in a fresh process and may import torch =============

class Budget:
    """The child's share of the global time guard."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


class Imports:
    """What the child tried to import and how it went (merged into the results)."""

    def __init__(self):
        self.status: dict[str, str] = {}

    def get(self, module: str, attr: str | None = None):
        try:
            mod = importlib.import_module(module)
            self.status[module] = "ok"
            return getattr(mod, attr) if attr else mod
        except Exception as e:  # noqa: BLE001 - ImportError or a broken dependency inside
            self.status[module] = f"missing: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            return None


class Nvml:
    """Process and device GPU memory: pynvml, else nvidia-smi, else nothing (None)."""

    def __init__(self, index: int, imports: Imports):
        self.index = index
        self.source = None
        pynvml = imports.get("pynvml")
        if pynvml is not None:
            try:
                pynvml.nvmlInit()
                self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._nv = pynvml
                self.source = "nvml"
            except Exception as e:  # noqa: BLE001 - no driver library: fall back
                imports.status["pynvml"] = f"broken: {e}"
        if self.source is None and shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"

    def _smi(self, query: str) -> str:
        return subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits", "-i",
                               str(self.index)], capture_output=True, text=True,
                              timeout=30).stdout

    def process(self, pid: int) -> int | None:
        try:
            if self.source == "nvml":
                procs = self._nv.nvmlDeviceGetComputeRunningProcesses(self._h)
                return sum(int(p.usedGpuMemory or 0) for p in procs if p.pid == pid) or None
            if self.source == "nvidia-smi":
                total = 0
                for line in self._smi("--query-compute-apps=pid,used_memory").splitlines():
                    p, _, mib = line.partition(",")
                    if p.strip() == str(pid) and mib.strip().isdigit():
                        total += int(mib) * MiB
                return total or None
        except Exception:  # noqa: BLE001 - unsupported query in this VM: use the device delta
            return None
        return None

    def device_used(self) -> int | None:
        try:
            if self.source == "nvml":
                return int(self._nv.nvmlDeviceGetMemoryInfo(self._h).used)
            if self.source == "nvidia-smi":
                return int(self._smi("--query-gpu=memory.used").strip()) * MiB
        except Exception:  # noqa: BLE001
            return None
        return None


class Device:
    """The child's device: synchronisation and the GPU memory readings (None on CPU)."""

    def __init__(self, plan: Plan, imports: Imports, *, torch_cuda: bool = True):
        import torch

        self.torch = torch
        self.cuda = plan.cuda
        self.dev = torch.device(plan.device)
        self.index = self.dev.index or 0
        self.context_bytes: int | None = None
        self.context_warm_bytes: int | None = None
        self.method: str | None = None
        self.meter = None
        self.env: dict[str, Any] = {"cuda_available": torch.cuda.is_available() if self.cuda
                                    else None}
        if plan.threads:
            torch.set_num_threads(plan.threads)
        if not self.cuda:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False: no usable CUDA device; "
                               "run with --cpu-smoke on a machine without a GPU")
        self.nvml = Nvml(self.index, imports)
        self.baseline_used = self.nvml.device_used()  # before this process has a context
        if torch_cuda:
            torch.cuda.set_device(self.dev)
            torch.zeros(1, device=self.dev)
            torch.cuda.synchronize(self.dev)
            self.context_bytes = max(0, self.process_bytes() -
                                     torch.cuda.memory_reserved(self.dev))
            meter_cls = imports.get("profiler.memory", "CudaMeter")
            try:  # memadapt's profiler meter: the figure its catalog would store
                self.meter = meter_cls(self.index, os.getpid(), torch=True) if meter_cls \
                    else None
            except Exception as e:  # noqa: BLE001 - its API moved: measure without it
                imports.status["profiler.memory"] = f"broken: CudaMeter: {e}"
            props = torch.cuda.get_device_properties(self.dev)
            self.env.update({"device_name": props.name,
                             "device_capability": f"{props.major}.{props.minor}",
                             "device_total_memory_bytes": int(props.total_memory),
                             "torch_cuda": torch.version.cuda,
                             "context_bytes": self.context_bytes,
                             "memory_method": self.method,
                             "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                             "tf32_cudnn": torch.backends.cudnn.allow_tf32})

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def process_bytes(self) -> int:
        """This process's GPU memory: NVML/nvidia-smi by pid, else the device-wide delta
        since before this process's context (children run one at a time), else
        ``mem_get_info`` (device-wide, counts any other process)."""
        b = self.nvml.process(os.getpid())
        if b:
            self.method = f"{self.nvml.source} (per process)"
            return b
        used = self.nvml.device_used()
        if used is not None and self.baseline_used is not None:
            self.method = f"{self.nvml.source} (device used minus the pre-start baseline)"
            return max(0, used - self.baseline_used)
        free, total = self.torch.cuda.mem_get_info(self.dev)
        self.method = "torch.cuda.mem_get_info (device-wide)"
        return int(total - free)

    def warm_libraries(self, dtype) -> int | None:
        """Load cuBLAS, cuDNN and the attention kernels (matmul, conv, sdpa, layer norm in
        ``dtype``) and return the context measured after them: what a serving process pays
        besides the allocator, so the reference for the profiler peak is allocator peak + this."""
        if not self.cuda:
            return None
        torch = self.torch
        F = torch.nn.functional
        with torch.inference_mode():
            a = torch.randn(256, 256, device=self.dev, dtype=dtype)
            (a @ a).sum().item()
            x = torch.randn(2, 64, 32, 32, device=self.dev, dtype=dtype)
            F.conv2d(x, torch.randn(64, 64, 3, 3, device=self.dev, dtype=dtype), padding=1)
            F.conv2d(x, torch.randn(64, 64, 1, 1, device=self.dev, dtype=dtype))
            q = torch.randn(2, 4, 128, 64, device=self.dev, dtype=dtype)
            F.scaled_dot_product_attention(q, q, q)
            F.layer_norm(a, (256,))
        del a, x, q
        self.free()
        used = max(0, self.process_bytes() - self.torch.cuda.memory_reserved(self.dev))
        self.context_warm_bytes = max(self.context_warm_bytes or 0, used)
        self.env["context_warm_bytes"] = self.context_warm_bytes
        return used

    def free(self, collect: bool = False) -> None:
        """Return cached blocks to the driver (``collect``: first break reference cycles,
        which costs a few hundred ms once torch and transformers are loaded)."""
        if collect:
            gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)
            self.torch.cuda.empty_cache()

    def allocated(self) -> int | None:
        return int(self.torch.cuda.memory_allocated(self.dev)) if self.cuda else None


# ---- models and variants --------------------------------------------------------------------

def _bert_wrapper():
    from torch import nn

    class BertEncoder(nn.Module):
        """``forward(input_ids, attention_mask) -> last_hidden_state``, as memadapt's."""

        def __init__(self, bert: nn.Module):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return BertEncoder


def build_base(plan: Plan, model: str):
    """The fp32 base model with seeded random weights (every child builds the same one)."""
    import torch

    torch.manual_seed(0)
    if model == "resnet":
        import torchvision

        return getattr(torchvision.models, plan.resnet)(num_classes=1000).eval()
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    layers, hidden, heads, ffn = plan.bert
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     intermediate_size=ffn, vocab_size=plan.vocab, max_position_embeddings=512)
    return _bert_wrapper()(BertModel(cfg, add_pooling_layer=False)).eval()


def exit_split(plan: Plan, model: str, m) -> tuple[Any, Any]:
    """The tail the exit variant drops (one container module) and the exit head (or None).

    ResNet: exit after layer2, head = avgpool (kept) + Linear(channels, classes);
    BERT: the first layers // 2 encoder layers, no head.
    """
    from torch import nn

    if model == "resnet":
        bns = [x for x in m.layer2.modules() if isinstance(x, nn.BatchNorm2d)]
        head = nn.Linear(bns[-1].num_features, m.fc.out_features)
        return nn.ModuleDict({"layer3": m.layer3, "layer4": m.layer4, "fc": m.fc}), head
    k = plan.bert[0] // 2
    return nn.ModuleList(list(m.bert.encoder.layer)[k:]), None


def drop_tail(plan: Plan, model: str, m, head) -> None:
    """Serve the prefix + exit head: the tail's modules are no longer referenced by ``m``."""
    from torch import nn

    if model == "resnet":
        m.layer3, m.layer4, m.fc = nn.Identity(), nn.Identity(), head
    else:
        m.bert.encoder.layer = nn.ModuleList(list(m.bert.encoder.layer)[:plan.bert[0] // 2])


def attach_tail(plan: Plan, model: str, m, tail) -> None:
    from torch import nn

    if model == "resnet":
        m.layer3, m.layer4, m.fc = tail["layer3"], tail["layer4"], tail["fc"]
    else:
        m.bert.encoder.layer = nn.ModuleList([*m.bert.encoder.layer, *tail])


def _keep(scores, count: int):
    import torch

    return torch.sort(torch.topk(scores, count).indices).values


def _round8(n: float) -> int:
    return max(8, int(round(n / 8)) * 8)


def _slice_(mod, name: str, idx, dim: int) -> None:
    import torch

    t = getattr(mod, name)
    new = t.detach().index_select(dim, idx).clone()
    if isinstance(t, torch.nn.Parameter):
        setattr(mod, name, torch.nn.Parameter(new, requires_grad=False))
    else:
        setattr(mod, name, new)


def _slice_linear(lin, idx, rows: bool) -> None:
    _slice_(lin, "weight", idx, 0 if rows else 1)
    if rows and lin.bias is not None:
        _slice_(lin, "bias", idx, 0)
    if rows:
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def prune_bert(plan: Plan, m, ratio: float) -> str:
    """Remove whole heads and FFN units by L2 magnitude, the same count in every layer
    (hidden size and embeddings kept), as variants.prune does for BERT: slicing is exact and
    takes a second, where torch_pruning's graph trace of a 12-layer BERT takes much longer."""
    import torch

    heads = plan.bert[2]
    keep_heads = max(1, round(heads * (1 - ratio)))
    for layer in m.bert.encoder.layer:
        sa, out = layer.attention.self, layer.attention.output.dense
        d = sa.attention_head_size
        w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight], 1)  # (H*d, 3*hidden)
        score = w.detach().view(heads, d, -1).pow(2).sum((1, 2))
        kept = _keep(score, keep_heads)
        idx = (kept[:, None] * d + torch.arange(d)).flatten()
        for lin in (sa.query, sa.key, sa.value):
            _slice_linear(lin, idx, rows=True)
        _slice_linear(out, idx, rows=False)
        sa.num_attention_heads, sa.all_head_size = keep_heads, keep_heads * d
        inter, down = layer.intermediate.dense, layer.output.dense
        idx = _keep(inter.weight.detach().pow(2).sum(1), _round8(inter.out_features * (1 - ratio)))
        _slice_linear(inter, idx, rows=True)
        _slice_linear(down, idx, rows=False)
    return f"L2 slicing: heads {heads}->{keep_heads}, FFN {plan.bert[3]}->{idx.numel()} per layer"


def prune_resnet(plan: Plan, m, ratio: float, imports: Imports) -> str:
    """torch_pruning as variants.prune does it (L2 group magnitude, fc kept, round_to 8);
    without it, the inner widths of every residual block by L2 magnitude."""
    import torch
    from torch import nn

    tp = imports.get("torch_pruning")
    if tp is not None:
        example = torch.randn(1, 3, plan.resolution, plan.resolution)
        for p in m.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            tp.pruner.BasePruner(m, example,
                                 importance=tp.importance.GroupMagnitudeImportance(p=2),
                                 pruning_ratio=ratio, ignored_layers=[m.fc], round_to=8).step()
        for p in m.parameters():
            p.requires_grad_(False)
        return "torch_pruning BasePruner, GroupMagnitudeImportance(p=2), fc kept, round_to=8"
    for block in m.modules():
        convs = [getattr(block, f"conv{i}", None) for i in (1, 2, 3)]
        bns = [getattr(block, f"bn{i}", None) for i in (1, 2, 3)]
        convs = [c for c in convs if isinstance(c, nn.Conv2d)]
        if len(convs) < 2 or not hasattr(block, "bn1"):
            continue
        for i in range(len(convs) - 1):  # output of conv i (inside the block) feeds conv i+1
            c, bn, nxt = convs[i], bns[i], convs[i + 1]
            idx = _keep(c.weight.detach().pow(2).sum((1, 2, 3)), _round8(c.out_channels *
                                                                          (1 - ratio)))
            _slice_(c, "weight", idx, 0)
            c.out_channels = len(idx)
            for name in ("weight", "bias", "running_mean", "running_var"):
                _slice_(bn, name, idx, 0)
            bn.num_features = len(idx)
            _slice_(nxt, "weight", idx, 1)
            nxt.in_channels = len(idx)
    return "fallback (no torch_pruning): inner widths of every residual block, L2 magnitude"


class _Structure:
    """Record and replay a pruned model's shapes: variants.prune's helpers, else a copy."""

    def __init__(self, imports: Imports):
        mod = imports.get("variants.prune")
        self.memadapt = mod is not None
        if mod is not None:
            self.snapshot, self.changes, self.apply = (mod.snapshot, mod.structure_changes,
                                                       mod.apply_structure)
        else:
            self.snapshot, self.changes, self.apply = _snapshot, _changes, _apply_structure


def _attrs(mod) -> dict:
    return {k: v for k, v in vars(mod).items() if not k.startswith("_") and k != "training"
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _snapshot(m):
    return ({k: tuple(v.shape) for k, v in m.state_dict().items()},
            {n: _attrs(x) for n, x in m.named_modules()})


def _changes(before, m) -> dict:
    shapes = {k: list(v.shape) for k, v in m.state_dict().items()
              if before[0].get(k) != tuple(v.shape)}
    owners = {k.rpartition(".")[0] for k in shapes}
    attrs = {}
    for n, x in m.named_modules():
        now = _attrs(x)
        if n in owners or now != before[1].get(n, now):
            attrs[n] = now
    return {"shapes": shapes, "attrs": attrs}


def _apply_structure(m, record: dict):
    import torch

    for name, shape in record["shapes"].items():
        owner_name, _, leaf = name.rpartition(".")
        owner = m.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(
                torch.zeros(shape, dtype=owner._parameters[leaf].dtype), requires_grad=False)
        else:
            owner._buffers[leaf] = torch.zeros(shape, dtype=owner._buffers[leaf].dtype)
    for mod_name, attrs in record["attrs"].items():
        for k, v in attrs.items():
            setattr(m.get_submodule(mod_name), k, v)
    return m


class VariantMaker:
    """Builds a variant (seeded, so every child agrees) and its empty skeleton for loading."""

    def __init__(self, plan: Plan, imports: Imports):
        self.plan, self.imports = plan, imports
        self.structure = _Structure(imports)
        self.records: dict[tuple[str, str], dict] = {}

    def make(self, model: str, variant: str) -> tuple[Any, str | None]:
        """(module on the CPU, how it was made)."""
        import torch

        m = build_base(self.plan, model)
        how = None
        if variant == "fp16":
            m = m.to(getattr(torch, self.plan.half))
        elif variant == "exit":
            _, head = exit_split(self.plan, model, m)
            drop_tail(self.plan, model, m, head)
            how = "ResNet cut after layer2 + avgpool + Linear" if model == "resnet" else \
                f"first {self.plan.bert[0] // 2} of {self.plan.bert[0]} encoder layers"
        elif variant.startswith("prune"):
            before = self.structure.snapshot(m)
            how = (prune_resnet(self.plan, m, PRUNE_RATIO, self.imports) if model == "resnet"
                   else prune_bert(self.plan, m, PRUNE_RATIO))
            self.records[(model, variant)] = self.structure.changes(before, m)
        for p in m.parameters():
            p.requires_grad_(False)
        return m.eval(), how

    def skeleton(self, model: str, variant: str):
        """What a loader builds before load_state_dict: the base, reshaped like the variant."""
        import torch

        m = build_base(self.plan, model)
        if variant == "fp16":
            m = m.to(getattr(torch, self.plan.half))
        elif variant == "exit":
            drop_tail(self.plan, model, m, exit_split(self.plan, model, m)[1])
        elif variant.startswith("prune"):
            self.structure.apply(m, self.records[(model, variant)])
        return m.eval()


def make_inputs(plan: Plan, model: str, batch: int, dev, dtype):
    import torch

    g = torch.Generator().manual_seed(batch)
    if model == "resnet":
        x = torch.randn(batch, 3, plan.resolution, plan.resolution, generator=g)
        return (x.to(dev, dtype),)
    ids = torch.randint(1000 if plan.vocab > 2000 else 0, plan.vocab, (batch, plan.seq_len),
                        generator=g)
    return ids.to(dev), torch.ones(batch, plan.seq_len, dtype=torch.long, device=dev)


def _dtype(m):
    return next(m.parameters()).dtype


def named_tensors(m) -> dict[str, Any]:
    """Every parameter and buffer, non-persistent buffers too (they must move as well)."""
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def tensor_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in named_tensors(m).values())


def assign(m, tensors: dict[str, Any]) -> None:
    """Point ``m``'s parameters and buffers at ``tensors`` (no copy)."""
    import torch

    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = m.get_submodule(owner_name) if owner_name else m
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t


class HostCopy:
    """A module's tensors in one pinned host buffer per dtype (the host tier), with views."""

    def __init__(self, m, pin: bool):
        import torch

        tensors = named_tensors(m)
        self.layout: list[tuple[str, Any, int, tuple]] = []
        sizes: dict[Any, int] = {}
        for name, t in tensors.items():
            self.layout.append((name, t.dtype, sizes.get(t.dtype, 0), tuple(t.shape)))
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        self.buffers = {}
        for dt, n in sizes.items():
            buf = torch.empty(n, dtype=dt)
            self.buffers[dt] = buf.pin_memory() if pin else buf
        for name, dt, off, _ in self.layout:
            n = tensors[name].numel()
            self.buffers[dt][off:off + n].copy_(tensors[name].detach().reshape(-1))
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers.values())
        self.pinned = pin

    def views(self, buffers=None) -> dict[str, Any]:
        bufs = buffers or self.buffers
        out = {}
        for name, dt, off, shape in self.layout:
            n = 1
            for s in shape:
                n *= s
            out[name] = bufs[dt][off:off + n].view(shape)
        return out


def _copy(t, dev, cuda: bool):
    """One host->device copy; on the CPU (smoke) a memcpy stands in for it."""
    return t.to(dev, non_blocking=True) if cuda else t.clone()


def host_upgrade(dev: Device, host: HostCopy, m, infer, check, reps: int, budget: Budget,
                 ) -> dict[str, Any]:
    """Bring ``m`` from the host tier to the device by each method; best of ``reps``.

    per_tensor: one non_blocking copy per parameter/buffer (what ``module.to`` does);
    flat: one copy per dtype of the flat pinned buffer, parameters become views;
    flat_prealloc: the same into device buffers allocated beforehand (a reserved slot).
    ``check(output)`` compares the first inference with the resident model's.
    """
    torch = dev.torch
    methods: dict[str, Any] = {}
    host_views = host.views()
    for method in ("flat", "flat_prealloc", "per_tensor"):
        if budget.left() < 2:
            methods[method] = {"skipped": "time budget"}
            continue
        pre = ({dt: torch.empty_like(b, device=dev.dev) for dt, b in host.buffers.items()}
               if method == "flat_prealloc" else None)
        runs, diff = [], 0.0
        dev.free()  # the first rep pays cudaMalloc, later ones reuse the allocator's cache
        for _ in range(reps):
            assign(m, host_views)  # the host tier: parameters are views of pinned memory
            dev.sync()
            t0 = time.perf_counter()
            if method == "per_tensor":
                moved = {n: _copy(t, dev.dev, dev.cuda) for n, t in host_views.items()}
                dev.sync()
                t1 = time.perf_counter()
                assign(m, moved)
            else:
                if pre is not None:
                    bufs = {dt: pre[dt].copy_(b, non_blocking=True) for dt, b in
                            host.buffers.items()}
                else:
                    bufs = {dt: _copy(b, dev.dev, dev.cuda) for dt, b in host.buffers.items()}
                dev.sync()
                t1 = time.perf_counter()
                assign(m, host.views(bufs))
            out = infer(m)
            dev.sync()
            t2 = time.perf_counter()
            runs.append((t1 - t0, t2 - t0))
            diff = max(diff, check(out))
            moved = bufs = out = None  # so the next rep can reuse these blocks from the cache
        best = min(runs)
        methods[method] = {"transfer_s": best[0], "total_s": min(r[1] for r in runs),
                           "max_rel_diff": diff,
                           "first_transfer_s": runs[0][0], "reps": len(runs),
                           "gbps": round(host.nbytes / best[0] / 1e9, 3) if best[0] > 0
                           else None}
        del pre
    assign(m, host_views)
    dev.free()
    return {"bytes": host.nbytes, "pinned": host.pinned, "methods": methods}


def drop_page_cache(path: Path) -> bool:
    """Evict the file from the page cache, so the next read comes from the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


class WeightsFile:
    """safetensors when importable, else torch.save of the state dict."""

    def __init__(self, imports: Imports):
        self.st = imports.get("safetensors.torch")
        self.format = "safetensors" if self.st is not None else "torch.save"

    def save(self, m, path: Path) -> Path:
        import torch

        sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
        path = path.with_suffix(".safetensors" if self.st is not None else ".pt")
        if self.st is not None:
            self.st.save_file(sd, str(path))
        else:
            torch.save(sd, path)
        return path

    def load(self, path: Path) -> dict:
        import torch

        if self.st is not None:
            return self.st.load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)


def cold_load(dev: Device, maker: VariantMaker, files: WeightsFile, path: Path, model: str,
              variant: str, infer, check, reps: int, budget: Budget) -> dict[str, Any]:
    """File -> construct -> load_state_dict -> device -> first inference; best of ``reps``."""
    runs = []
    dropped = True
    for _ in range(reps):
        if runs and budget.left() < 3 * runs[0]["total_s"] + 1:
            break
        dropped = drop_page_cache(path) and dropped
        dev.free()
        t0 = time.perf_counter()
        sd = files.load(path)
        t1 = time.perf_counter()
        m = maker.skeleton(model, variant)
        t2 = time.perf_counter()
        m.load_state_dict(sd)
        t3 = time.perf_counter()
        m = m.to(dev.dev)
        dev.sync()
        t4 = time.perf_counter()
        out = infer(m)
        dev.sync()
        t5 = time.perf_counter()
        runs.append({"read_s": t1 - t0, "construct_s": t2 - t1, "load_s": t3 - t2,
                     "to_device_s": t4 - t3, "first_infer_s": t5 - t4, "total_s": t5 - t0,
                     "max_rel_diff": check(out)})
        del m, sd, out
    dev.free()
    best = min(runs, key=lambda r: r["total_s"])
    return {"best_total_s": best["total_s"], "breakdown": best, "reps": len(runs),
            "max_rel_diff": max(r["max_rel_diff"] for r in runs),
            "file_bytes": path.stat().st_size, "format": files.format,
            "page_cache_dropped": dropped}


def measure_batches(dev: Device, plan: Plan, model: str, m, budget: Budget, time_runs,
                    ) -> tuple[list[dict], str | None]:
    """Latency and memory per batch size (ascending); stops at the time guard."""
    torch = dev.torch
    out = []
    for batch in plan.batches:
        if budget.left() < 3:
            return out, f"batches from {batch} on: time budget"
        inputs = make_inputs(plan, model, batch, dev.dev, _dtype(m))
        dev.free()
        if dev.cuda:
            torch.cuda.reset_peak_memory_stats(dev.dev)
            _meter(dev, "reset")

        def run(inputs=inputs):
            with torch.inference_mode():
                return m(*inputs)

        try:
            stats = time_runs(run, batch=batch, runs=plan.runs, warmup=plan.warmup,
                              threads=torch.get_num_threads(),
                              sync=dev.sync if dev.cuda else None)
        except torch.cuda.OutOfMemoryError as e:
            out.append({"batch": batch, "status": "oom", "error": str(e).splitlines()[0]})
            break
        row: dict[str, Any] = {"batch": batch, "p50_s": stats.p50_s, "p95_s": stats.p95_s,
                               "p99_s": stats.p99_s, "mean_s": stats.mean_s,
                               "throughput": stats.throughput, "runs": stats.runs}
        if dev.cuda:
            dev.sync()
            max_alloc = int(torch.cuda.max_memory_allocated(dev.dev))
            reserved = int(torch.cuda.memory_reserved(dev.dev))
            proc = dev.process_bytes()
            script_peak = max(0, proc - reserved) + max_alloc  # CudaMeter's formula
            memadapt_peak = _meter(dev, "peak")
            peak = memadapt_peak if memadapt_peak is not None else script_peak
            ctx = dev.context_warm_bytes if dev.context_warm_bytes is not None \
                else dev.context_bytes
            ref = max_alloc + (ctx or 0)
            row.update({"max_memory_allocated": max_alloc, "memory_reserved": reserved,
                        "process_bytes": proc, "profiler_peak": peak,
                        "profiler_peak_source": "memadapt profiler.memory.CudaMeter"
                        if memadapt_peak is not None else "gpu_check (CudaMeter's formula)",
                        "profiler_peak_script": script_peak, "reference_peak": ref,
                        "peak_ratio_bare_context": round(
                            peak / (max_alloc + dev.context_bytes), 4)
                        if dev.context_bytes is not None else None,
                        "peak_ratio": round(peak / ref, 4) if ref else None,
                        "peak_ratio_script": round(script_peak / ref, 4) if ref else None,
                        "process_over_reference": round(proc / ref, 4) if ref else None})
        out.append(row)
        del inputs
    return out, None


def _meter(dev: Device, call: str):
    """``dev.meter.<call>()``; None (and the meter dropped) if memadapt's meter fails."""
    try:
        return getattr(dev.meter, call)() if dev.meter is not None else None
    except Exception as e:  # noqa: BLE001 - the script's own figure stands in
        dev.env["cudameter_error"] = f"{call}: {type(e).__name__}: {e}"
        dev.meter = None
        return None


def _time_runs_fallback(run, *, batch, runs, warmup, threads, sync=None):
    """profiler.latency.time_runs, when memadapt is not importable."""
    from types import SimpleNamespace

    for _ in range(warmup):
        run()
    if sync:
        sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=100, method="inclusive") if len(times) > 1 else times * 99
    mean = statistics.fmean(times)
    return SimpleNamespace(p50_s=statistics.median(times), p95_s=q[94], p99_s=q[98], mean_s=mean,
                           throughput=batch / mean, runs=len(times))


def run_torch(plan: Plan, job: dict, dev: Device, imports: Imports, budget: Budget,
              workdir: Path) -> dict[str, Any]:
    model, variant = job["model"], job["variant"]
    torch = dev.torch
    res: dict[str, Any] = {**job, "status": "ok", "skipped_parts": {}}
    time_runs = imports.get("profiler.latency", "time_runs") or _time_runs_fallback
    maker = VariantMaker(plan, imports)
    t0 = time.perf_counter()
    m, how = maker.make(model, variant)
    res["build_s"] = round(time.perf_counter() - t0, 3)
    if how:
        res["method"] = how
    res["params"] = sum(p.numel() for p in m.parameters())
    res["tensor_bytes"] = tensor_bytes(m)
    res["context_warm_bytes"] = dev.warm_libraries(_dtype(m))
    files = WeightsFile(imports)
    path = files.save(m, workdir / f"{model}-{variant}")
    host = HostCopy(m, pin=dev.cuda)  # the host tier, pinned before any timing

    before = dev.allocated()
    t0 = time.perf_counter()
    m = m.to(dev.dev)
    dev.sync()
    res["first_to_device_s"] = round(time.perf_counter() - t0, 4)
    res["weights_bytes"] = (dev.allocated() - before) if dev.cuda else res["tensor_bytes"]
    res["batches"], stop = measure_batches(dev, plan, model, m, budget, time_runs)
    if stop:
        res["skipped_parts"]["latency"] = stop
    one = make_inputs(plan, model, 1, dev.dev, _dtype(m))

    def infer(mod):
        with torch.inference_mode():
            return mod(*one)

    ref = infer(m).float().cpu()

    def check(out) -> float:
        """Max abs difference to the resident model's output, relative to its scale."""
        return float((out.float().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))

    swaps: dict[str, Any] = {"bytes": host.nbytes}
    res["swaps"] = swaps
    if budget.left() > 3:
        swaps["host"] = host_upgrade(dev, host, m, infer, check, plan.host_reps, budget)
    else:
        res["skipped_parts"]["host-tier upgrade"] = "time budget"
    del m
    dev.free(collect=True)
    if budget.left() > 5:
        swaps["cold"] = cold_load(dev, maker, files, path, model, variant, infer, check,
                                  plan.cold_reps, budget)
    else:
        res["skipped_parts"]["cold load"] = "time budget"
    if variant == "exit":
        if budget.left() > 5:
            swaps["downgrade"] = downgrade_cycle(plan, dev, model, budget)
        else:
            res["skipped_parts"]["in-place downgrade"] = "time budget"
    if res["skipped_parts"]:
        res["status"] = "partial"
    path.unlink(missing_ok=True)
    return res


def downgrade_cycle(plan: Plan, dev: Device, model: str, budget: Budget) -> dict[str, Any]:
    """Full model resident -> drop the tail in place (prefix + exit head serve) -> copy the
    tail's bytes back from pinned host memory (full model serves again), ``host_reps`` times."""
    torch = dev.torch
    full = build_base(plan, model)
    for p in full.parameters():
        p.requires_grad_(False)
    tail, head = exit_split(plan, model, full)
    host = HostCopy(tail, pin=dev.cuda)  # the tail's host-tier copy
    host_views = host.views()
    full = full.to(dev.dev)
    if head is not None:
        head = head.to(dev.dev).requires_grad_(False)
    dev.sync()
    one_full = make_inputs(plan, model, 1, dev.dev, _dtype(full))

    def infer(mod):
        with torch.inference_mode():
            return mod(*one_full)

    ref = infer(full).float().cpu()
    full_shape, diffs = tuple(ref.shape), []
    drops, frees, exits, freed_alloc, freed_proc, ups, shapes = [], [], [], [], [], [], set()
    for _ in range(plan.host_reps):
        if budget.left() < 2:
            break
        dev.sync()
        alloc0, proc0 = dev.allocated(), dev.process_bytes() if dev.cuda else None
        t0 = time.perf_counter()
        drop_tail(plan, model, full, head)
        assign(tail, host_views)  # the tail's device tensors lose their last reference
        t1 = time.perf_counter()
        dev.free()
        t2 = time.perf_counter()
        shapes.add(tuple(infer(full).shape))
        dev.sync()
        t3 = time.perf_counter()
        drops.append(t1 - t0)
        frees.append(t2 - t1)
        exits.append(t3 - t2)
        if dev.cuda:
            freed_alloc.append(alloc0 - dev.allocated())
            freed_proc.append(proc0 - dev.process_bytes())
        # upgrade back: only the tail's bytes cross the bus, one flat copy per dtype
        t4 = time.perf_counter()
        bufs = {dt: _copy(b, dev.dev, dev.cuda) for dt, b in host.buffers.items()}
        dev.sync()
        t5 = time.perf_counter()
        assign(tail, host.views(bufs))
        bufs = None  # the views alone keep the tail alive, so the next drop frees it
        attach_tail(plan, model, full, tail)
        out = infer(full)
        dev.sync()
        t6 = time.perf_counter()
        diffs.append(float((out.float().cpu() - ref).abs().max()
                           / ref.abs().max().clamp_min(1e-6)))
        if tuple(out.shape) != full_shape:
            raise RuntimeError(f"after the upgrade the model returns {tuple(out.shape)}, "
                               f"not {full_shape}")
        ups.append((t5 - t4, t6 - t4))
    if not ups:
        return {"skipped": "time budget"}
    best = min(ups)
    res = {"reps": len(ups), "drop_s": min(drops), "free_s": min(frees),
           "exit_first_infer_s": min(exits), "exit_output_shapes": sorted(shapes),
           "full_output_shape": full_shape, "tail_bytes": host.nbytes,
           "upgrade_max_rel_diff": max(diffs),
           "full_bytes": tensor_bytes(full), "head_bytes": tensor_bytes(head) if head is not None
           else 0, "freed_allocated_bytes": min(freed_alloc) if freed_alloc else None,
           "freed_process_bytes": min(freed_proc) if freed_proc else None,
           "upgrade": {"bytes": host.nbytes, "pinned": host.pinned, "methods": {
               "flat": {"transfer_s": best[0], "total_s": min(u[1] for u in ups),
                        "gbps": round(host.nbytes / best[0] / 1e9, 3) if best[0] > 0
                        else None}}}}
    del full, tail, head
    dev.free(collect=True)
    return res


def run_bandwidth(plan: Plan, dev: Device) -> dict[str, Any]:
    """Best-of-N host->device copy of a pinned buffer (the physical limit of an upgrade)."""
    torch = dev.torch
    n = plan.bandwidth_mib * MiB
    src = torch.ones(n, dtype=torch.uint8)  # ones: touched pages, no zero-page shortcut
    pinned = src.pin_memory() if dev.cuda else src
    dst = torch.empty(n, dtype=torch.uint8, device=dev.dev)

    def best(fn) -> float:
        fn()
        fn()
        times = []
        for _ in range(plan.bandwidth_reps):
            dev.sync()
            t0 = time.perf_counter()
            fn()
            dev.sync()
            times.append(time.perf_counter() - t0)
        return round(n / min(times) / 1e9, 3)

    if not dev.cuda:
        gbps = best(lambda: dst.copy_(src))
        return {"status": "ok", "bytes": n, "reps": plan.bandwidth_reps,
                "method": "cpu memcpy (stand-in: no GPU)", "pinned_h2d_gbps": gbps,
                "pinned_h2d_prealloc_gbps": gbps, "pageable_h2d_gbps": None,
                "pinned_d2h_gbps": None}
    return {"status": "ok", "bytes": n, "reps": plan.bandwidth_reps,
            "method": "perf_counter around the copy + synchronize",
            "pinned_h2d_gbps": best(lambda: pinned.to(dev.dev, non_blocking=True)),
            "pinned_h2d_prealloc_gbps": best(lambda: dst.copy_(pinned, non_blocking=True)),
            "pageable_h2d_gbps": best(lambda: src.to(dev.dev)),
            "pinned_d2h_gbps": best(lambda: pinned.copy_(dst, non_blocking=True))}


def run_ort(plan: Plan, job: dict, dev: Device, imports: Imports, budget: Budget,
            workdir: Path) -> dict[str, Any]:
    """Export with the dynamo exporter (one file, no external data) and time it in
    onnxruntime (CUDA EP on cuda, CPU EP in the smoke run); memory from NVML."""
    import contextlib
    import io
    import warnings

    import numpy as np
    import torch

    model, variant = job["model"], job["variant"]
    res: dict[str, Any] = {**job, "status": "ok", "skipped_parts": {}}
    ort = imports.get("onnxruntime")
    if ort is None:
        return {**res, "status": "skipped", "error": "onnxruntime is not importable"}
    m, _ = VariantMaker(plan, imports).make(model, variant)
    example = make_inputs(plan, model, 2, torch.device("cpu"), _dtype(m))
    names = ["input"] if model == "resnet" else ["input_ids", "attention_mask"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    path = workdir / f"{model}-{variant}.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, example, str(path), dynamo=True, external_data=False,
                          input_names=names, output_names=["output"],
                          dynamic_shapes=tuple({0: batch} for _ in names), optimize=True)
    res["export_s"] = round(time.perf_counter() - t0, 2)
    res["onnx_bytes"] = path.stat().st_size
    del m
    gc.collect()
    if budget.left() < 5:
        return {**res, "status": "partial", "skipped_parts": {"session": "time budget"}}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if dev.cuda:
        providers: list[Any] = [("CUDAExecutionProvider", {
            "device_id": dev.index, "arena_extend_strategy": "kSameAsRequested"}),
            "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
        if plan.threads:
            opts.intra_op_num_threads = plan.threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    res["provider"] = sess.get_providers()[0]
    if dev.cuda and res["provider"] != "CUDAExecutionProvider":
        return {**res, "status": "error", "error": f"the CUDA EP did not start (providers "
                f"{sess.get_providers()})"}
    in_types = {i.name: i.type for i in sess.get_inputs()}

    def feed(b):
        xs = make_inputs(plan, model, b, torch.device("cpu"), torch.float32)
        out = {}
        for name, x in zip(names, xs):
            arr = x.numpy()
            out[name] = arr.astype(np.float16) if in_types[name] == "tensor(float16)" else arr
        return out

    sess.run(None, feed(1))
    res["session_s"] = round(time.perf_counter() - t0, 3)
    res["static_process_bytes"] = dev.process_bytes() if dev.cuda else None
    res["batches"] = []
    for b in plan.ort_batches:
        if budget.left() < 3:
            res["skipped_parts"][f"batch {b}+"] = "time budget"
            res["status"] = "partial"
            break
        f = feed(b)
        times = []
        for i in range(plan.warmup + plan.runs):
            t = time.perf_counter()
            sess.run(None, f)
            if i >= plan.warmup:
                times.append(time.perf_counter() - t)
        times.sort()
        res["batches"].append({
            "batch": b, "p50_s": statistics.median(times),
            "p99_s": times[min(len(times) - 1, int(0.99 * len(times)))],
            "throughput": b / statistics.fmean(times),
            "process_bytes": dev.process_bytes() if dev.cuda else None})
    path.unlink(missing_ok=True)
    return res


def child_main(spec: dict) -> int:
    """Run the jobs of one child; print one JSON line (marked) on stdout."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    plan = Plan.from_dict(spec["plan"])
    budget = Budget(spec["deadline"])
    workdir = Path(spec["workdir"])
    imports = Imports()
    out: dict[str, Any] = {"env": {}, "imports": imports.status, "results": []}
    try:
        torch_cuda = any(j["kind"] != "ort" for j in spec["jobs"])
        dev = Device(plan, imports, torch_cuda=torch_cuda)
    except Exception as e:  # noqa: BLE001 - report, don't crash: the parent records it
        out["env"]["cuda_available"] = False
        out["results"] = [{**j, "status": "error", "error": f"{type(e).__name__}: {e}"}
                          for j in spec["jobs"]]
        print(RESULT_MARK + json.dumps(out, default=str), flush=True)
        return 0
    for job in spec["jobs"]:
        if budget.left() < 2:
            out["results"].append({**job, "status": "skipped", "error": "time budget"})
            continue
        t0 = time.perf_counter()
        try:
            if job["kind"] == "bandwidth":
                res = {**job, **run_bandwidth(plan, dev)}
            elif job["kind"] == "torch":
                res = run_torch(plan, job, dev, imports, budget, workdir)
            else:
                res = run_ort(plan, job, dev, imports, budget, workdir)
        except Exception as e:  # noqa: BLE001 - one failed job must not lose the others
            res = {**job, "status": "oom" if "out of memory" in str(e).lower() else "error",
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "traceback": traceback.format_exc(limit=6)}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        out["results"].append(res)
        dev.free(collect=True)
    out["env"].update(dev.env)
    out["env"]["memory_method"] = dev.method
    print(RESULT_MARK + json.dumps(out, default=str), flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu-<date>.json/.md (default benchmarks/results; "
                                 "in --cpu-smoke a temp folder, never benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="global time guard: stop cleanly, results written, before this")
    p.add_argument("--quick", action="store_true", help="fewer timed runs and repetitions")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the whole flow on the CPU with tiny models (no GPU needed)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--isolate", choices=("variant", "model", "run"),
                   help="what one child process measures (default: variant; run in --cpu-smoke)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
