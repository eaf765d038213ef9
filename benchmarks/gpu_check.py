"""GPU path check: memadapt's variants generated, profiled and served on one CUDA device.

One prepared script for a short device lease. Everything it measures goes through the
library: ``variants.generate`` makes ResNet-50 (224x224) and BERT-base (seq 128) variants
(fp32, fp16, prune0.5, an early exit), ``profiler.profile(device="cuda")`` measures them
into the store's catalog (torch and onnxruntime's CUDA EP), ``variants.shared`` downgrades
the resident full model to its exit variant in place and back, and a
``VariantCache(device="cuda")`` follows a budget down and up. What only a GPU run needs,
NVML and pinned-memory bandwidth, is ``profiler.gpu``.

Three parts: the plan (:mod:`gpu_check_plan`), the child runner that runs steps in fresh
processes (:mod:`gpu_check_child`) and the report (:mod:`gpu_check_report`). A global
time guard (``--budget-s``) never starts a step it cannot finish and rewrites the results
after every child, so a cut-short run still reports what it measured.

Run (repo root):
    python benchmarks/gpu_check.py                        # results/gpu-<date>.{json,md}
    python benchmarks/gpu_check.py --out DIR --quick
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpusmoke   # no GPU needed
``--cpu-smoke`` runs the same steps on the CPU with ResNet-10 at 32x32 and BERT-tiny
(the test suite runs it). ``benchmarks/GPU.md`` says how to run it on the device machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gpu_check_report as report_mod  # noqa: E402
from gpu_check_child import RESULT_MARK  # noqa: E402
from gpu_check_plan import (  # noqa: E402
    CHILD_MARGIN_S,
    MIN_STEP_S,
    NEEDS,
    SCHEMA,
    STEPS,
    Plan,
    make_plan,
)

log = logging.getLogger("benchmarks.gpu_check")

#: what the library needs to generate, profile and serve (missing ones fail their step)
REQUIRED = ("torch", "torchvision", "transformers", "safetensors", "onnx", "onnxscript",
            "onnxruntime", "torch_pruning")
DISTRIBUTIONS = ("torch", "torchvision", "transformers", "numpy", "onnx", "onnxscript",
                 "onnxruntime", "onnxruntime-gpu", "safetensors", "torch-pruning",
                 "nvidia-ml-py", "pynvml")


def probe_env(plan: Plan) -> dict[str, Any]:
    """Versions, onnxruntime's providers and the GPU's name, without importing torch."""
    versions = {}
    for dist in DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    versions["python"] = sys.version.split()[0]
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    providers: list[str] = []
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort  # lists compiled-in providers; starts no CUDA context

        providers = list(ort.get_available_providers())
    device: dict[str, Any] = {"requested": plan.device}
    smi = shutil.which("nvidia-smi")
    if plan.cuda and smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader", "-i", plan.device.partition(":")[2]
                                or "0"], capture_output=True, text=True, timeout=30).stdout
            name, driver, total = (s.strip() for s in (q.strip().split(",") + ["", ""])[:3])
            device.update({"name": name, "driver": driver, "memory_total": total})
        except (OSError, subprocess.SubprocessError) as e:
            device["nvidia_smi_error"] = str(e)
    return {"versions": versions, "onnxruntime_providers": providers, "device": device,
            "missing": missing}


def run_child(plan: Plan, steps: list[str], store: Path, workdir: Path, deadline: float,
              done: dict[str, str]) -> dict[str, Any]:
    """One child process over ``steps``; its results, or an error per step."""
    spec_path = workdir / f"spec-{steps[0]}.json"
    spec_path.write_text(json.dumps({"plan": plan.to_dict(), "steps": steps,
                                     "store": str(store), "done": done,
                                     "deadline": deadline - CHILD_MARGIN_S}))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    if plan.threads:
        env["OMP_NUM_THREADS"] = str(plan.threads)
    cmd = [sys.executable, str(HERE / "gpu_check_child.py"), str(spec_path)]
    timeout = max(1.0, deadline - time.time())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"env": {}, "results": {s: {"status": "timeout", "error": f"child killed after "
                                           f"{timeout:.0f} s (time budget)"} for s in steps}}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return {"env": {}, "results": {s: {"status": "error", "error": f"child exited "
                                       f"{proc.returncode} without a result",
                                       "stderr_tail": proc.stderr[-2000:]} for s in steps}}


def step_groups(isolate: str) -> list[list[str]]:
    """Which steps share a child process: each its own (``step``) or all in one (``run``)."""
    return [list(STEPS)] if isolate == "run" else [[s] for s in STEPS]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    plan = make_plan(args)
    t_start = time.time()
    deadline = t_start + args.budget_s
    smoke = plan.mode == "cpu-smoke"
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "gpu-check-smoke" if smoke else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = probe_env(plan)
    report: dict[str, Any] = {
        "schema": SCHEMA, "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "mode": plan.mode,
        "budget_s": args.budget_s, "elapsed_s": 0.0, "stopped_early": False,
        "device": env["device"], "versions": env["versions"],
        "onnxruntime_providers": env["onnxruntime_providers"], "missing": env["missing"],
        "plan": plan.to_dict(),
        "steps": {}, "profiles": [], "skipped": [], "targets": {}}
    if plan.cuda and "onnxruntime" in plan.backends and \
            "CUDAExecutionProvider" not in env["onnxruntime_providers"]:
        plan = Plan.from_dict({**plan.to_dict(), "backends": [b for b in plan.backends
                                                              if b != "onnxruntime"]})
        report["skipped"].append({"what": "onnxruntime CUDA EP profiles",
                                  "reason": "the installed onnxruntime has no "
                                            "CUDAExecutionProvider (needs onnxruntime-gpu)"})
    stem = f"gpu-{report['date']}"
    paths = (out_dir / f"{stem}.json", out_dir / f"{stem}.md")
    done: dict[str, str] = {}
    no_cuda = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        store = Path(args.store) if args.store else workdir / "store"
        for group in step_groups(args.isolate or ("run" if smoke else "step")):
            left = deadline - time.time()
            need = 3.0 if smoke else max(MIN_STEP_S[s] for s in group)
            blocked = [s for s in group for n in NEEDS.get(s, ())
                       if n not in group and done.get(n) not in ("ok", "partial")]
            if no_cuda or blocked or left < need + CHILD_MARGIN_S:
                why = ("no CUDA device (an earlier child found none)" if no_cuda else
                       f"needs {', '.join(NEEDS[blocked[0]])}, which did not succeed"
                       if blocked else f"time budget: {left:.0f} s left, the step needs "
                                       f"about {need:.0f} s")
                report["stopped_early"] |= not (no_cuda or blocked)
                report["skipped"] += [{"what": s, "reason": why} for s in group]
                continue
            out = run_child(plan, group, store, workdir, deadline, done)
            for k, v in (out.get("env") or {}).items():
                if v is not None and k != "cuda":
                    report["device"][k] = v
            no_cuda = plan.cuda and (out.get("env") or {}).get("cuda") is False
            for step, res in out["results"].items():
                report["steps"][step] = res
                done[step] = res.get("status")
                log.info("[%6.1fs] %-10s %s%s", time.time() - t_start, step, res.get("status"),
                         f": {res['error']}" if res.get("error") else "")
            report["profiles"] = report_mod.profile_rows(store, plan.device, plan.backends) \
                if done.get("profile") in ("ok", "partial") else []
            report["elapsed_s"] = round(time.time() - t_start, 1)
            report_mod.finalize(report)
            report_mod.write(report, paths)
    report["elapsed_s"] = round(time.time() - t_start, 1)
    report_mod.finalize(report)
    report_mod.write(report, paths)
    for line in report_mod.summary_lines(report):
        print(line)
    print(f"wrote {paths[0]} and {paths[1]}")
    if no_cuda:
        return 2
    return 0 if all(r.get("status") == "ok" for r in report["steps"].values()) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu-<date>.json/.md (default benchmarks/results; "
                                 "in --cpu-smoke a temp folder, never benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="global time guard: stop cleanly, results written, before this")
    p.add_argument("--quick", action="store_true", help="fewer batches and timed runs")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the same steps on the CPU with tiny models (no GPU needed)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--store", help="variant store to generate into and reuse (default: a "
                                   "temporary one); a second run skips stored variants")
    p.add_argument("--isolate", choices=("step", "run"),
                   help="one child process per step (default) or one for the whole run "
                        "(default in --cpu-smoke)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
