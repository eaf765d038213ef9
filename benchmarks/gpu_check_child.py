"""The GPU check's child runner: one step of the plan in a fresh process, on the library.

``python benchmarks/gpu_check_child.py SPEC.json`` runs one step and prints one JSON line
(marked with :data:`RESULT_MARK`) on stdout. Every step goes through memadapt's public
API, so a device run certifies the code memadapt ships:

- ``generate``: ``variants.generate`` (prune, early exit, fp16, recovered) per model;
- ``bandwidth``: ``profiler.gpu.copy_bandwidth`` (pinned host -> device; memcpy on CPU);
- ``downgrade``: the torch session of the full model on the device,
  ``variants.shared.downgrade_in_place`` to its exit variant and ``upgrade_in_place``
  back, with the device memory freed, the outputs against the stored variants' own
  sessions, and the allocator peak + context at each batch (the profiler's cross-check);
- ``profile``: ``profiler.profile(store, device=...)`` per backend (its own child per
  variant and batch), recorded in the store's catalog;
- ``serve``: a ``VariantCache(store, device=...)`` over the catalog, following a budget
  down (downgrades) and up again, every answer checked against a direct session.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from gpu_check_plan import NEEDS, MiB, ModelPlan, Plan  # noqa: E402

RESULT_MARK = "GPU_CHECK_RESULT "


# ---- helpers -----------------------------------------------------------------------------------

class Device:
    """The step's device: synchronisation and GPU memory readings (None on the CPU)."""

    def __init__(self, plan: Plan):
        self.name = plan.device
        self.cuda = plan.cuda
        self.torch = None
        self.nvml = None
        if not self.cuda:
            return
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False: no usable CUDA device; "
                               "run with --cpu-smoke on a machine without a GPU")
        from profiler.gpu import Nvml

        self.torch = torch
        self.dev = torch.device(plan.device)
        torch.cuda.set_device(self.dev)
        torch.zeros(1, device=self.dev)
        self.index = self.dev.index or 0
        try:
            self.nvml = Nvml(self.index)
        except RuntimeError:
            self.nvml = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def allocated(self) -> int | None:
        return int(self.torch.cuda.memory_allocated(self.dev)) if self.cuda else None

    def outside_allocator(self) -> int | None:
        """What the process holds on the device that the allocator does not (the context,
        library workspaces): NVML's figure minus what the allocator reserved."""
        if not self.cuda or self.nvml is None:
            return None
        used = self.nvml.process_bytes(os.getpid())
        return max(0, used - int(self.torch.cuda.memory_reserved(self.dev))) if used else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)
            self.torch.cuda.empty_cache()

    def info(self) -> dict[str, Any]:
        if not self.cuda:
            return {"cuda": False}
        props = self.torch.cuda.get_device_properties(self.dev)
        return {"cuda": True, "name": props.name, "capability": f"{props.major}.{props.minor}",
                "total_memory_bytes": int(props.total_memory),
                "torch_cuda": self.torch.version.cuda,
                "memory_method": None if self.nvml is None else self.nvml.source,
                "context_bytes": self.outside_allocator()}


def rel_diff(got, want) -> float:
    """max |got - want| / max |want| (0 when both are zero)."""
    import numpy as np

    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        return float("inf")
    scale = float(np.abs(w).max()) or 1.0
    return float(np.abs(g - w).max()) / scale


def _numpy(x):
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else x


def inputs_for(store, name: str, batch: int, seed: int = 0) -> dict[str, Any]:
    """Example inputs of the stored variant ``name`` by input name (numpy)."""
    import variants

    m = store.get(name)
    fam = variants.get_family(m.family)
    xs = fam.example_inputs(m.arch, batch, seed=seed)
    return {i["name"]: x.numpy() for i, x in zip(m.inputs, xs)}


def _timed(dev: Device, fn, *args):
    dev.sync()
    t = time.perf_counter()
    out = fn(*args)
    dev.sync()
    return out, time.perf_counter() - t


# ---- steps -------------------------------------------------------------------------------------

def step_generate(plan: Plan, store_root: Path, dev: Device) -> dict[str, Any]:
    import variants

    out = []
    for m in plan.models:
        t = time.perf_counter()
        results = variants.generate(m.name, store_root, prune=[m.prune], exits=[m.exit],
                                    quantize=["fp16"], recover_steps=plan.recover_steps,
                                    calib=plan.calib, **m.options)
        out.append({"model": m.key, "name": m.name, "seconds": round(time.perf_counter() - t, 2),
                    "variants": [{"name": r.name, "skipped": bool(getattr(r, "skipped", False))}
                                 for r in results]})
    store = variants.Store(store_root)
    stored = []
    for m in plan.models:
        for kind, name in m.variants().items():
            man = store.get(name)
            stored.append({"model": m.key, "kind": kind, "name": name, "params": man.params,
                           "onnx_bytes": man.bytes,
                           "weights_bytes": (man.weights_path.stat().st_size
                                             if man.weights_path else None)})
    return {"status": "ok", "models": out, "variants": stored}


def step_bandwidth(plan: Plan, store_root: Path, dev: Device) -> dict[str, Any]:
    from profiler.gpu import copy_bandwidth

    bw = copy_bandwidth(plan.device, plan.bandwidth_mib * MiB, plan.bandwidth_reps)
    return {"status": "ok", **bw.to_dict()}


def _upgrade(small, fam, full_m, keys, device: str):
    """``upgrade_in_place`` back to the full model, the tail read from its file onto the
    device (the prefix is already there)."""
    from variants.shared import upgrade_in_place

    mod, read = upgrade_in_place(small, fam, full_m.arch, full_m.weights_path, keys)
    return mod.to(device), read


def _downgrade_one(plan: Plan, m: ModelPlan, store, dev: Device) -> dict[str, Any]:
    import torch

    import variants
    from variants.shared import (
        downgrade_in_place,
        exit_head_keys,
        load_exit_head,
        module_tensors,
    )

    full_name, exit_name = m.variant("fp32"), m.variant("exit")
    full_m, exit_m = store.get(full_name), store.get(exit_name)
    fam = variants.get_family(full_m.family)
    res: dict[str, Any] = {"model": m.key, "full": full_name, "exit": exit_name}
    feed = inputs_for(store, full_name, 1, seed=1)
    want_exit = variants.open_session(store, exit_name, device=plan.device,
                                      backend="torch").run(feed)
    # the allocator peak + context per batch: what the profiler's CUDA meter reports
    peaks = []
    for batch in plan.batches:
        sess = variants.open_session(store, full_name, device=plan.device, backend="torch")
        x = inputs_for(store, full_name, batch)
        dev.free()
        if dev.cuda:
            torch.cuda.reset_peak_memory_stats(dev.dev)
        sess.run(x)
        outside = dev.outside_allocator()
        peaks.append({"batch": batch,
                      "max_memory_allocated": (int(torch.cuda.max_memory_allocated(dev.dev))
                                               if dev.cuda else None),
                      "outside_allocator": outside})
        sess.close()
        del sess
    timings = []
    for _ in range(plan.downgrade_reps):
        sess = variants.open_session(store, full_name, device=plan.device, backend="torch")
        full = sess.module
        want_full = sess.run(feed)
        head = {k: v.to(next(full.parameters()).device)
                for k, v in load_exit_head(fam, exit_m.arch, exit_m.weights_path).items()}
        dev.free()
        before = dev.allocated()
        (small, freed), drop_s = _timed(dev, downgrade_in_place, full, fam, exit_m.arch, head)
        sess.module = small  # the session now serves the exit variant
        t = time.perf_counter()
        dev.free()
        free_s = time.perf_counter() - t
        after = dev.allocated()
        got_exit, first_s = _timed(dev, sess.run, feed)
        keys = exit_head_keys(fam, exit_m.arch)
        (big, read), up_s = _timed(dev, _upgrade, small, fam, full_m, keys, plan.device)
        sess.module = big
        got_full, up_first_s = _timed(dev, sess.run, feed)
        tensors = module_tensors(big)
        tail = sum(tensors[k].numel() * tensors[k].element_size() for k in read if k in tensors)
        timings.append({"drop_s": drop_s, "free_s": free_s, "exit_first_infer_s": first_s,
                        "upgrade_s": up_s, "upgrade_first_infer_s": up_first_s,
                        "freed_bytes": int(freed),
                        "freed_allocated_bytes": (before - after) if dev.cuda else None,
                        "tail_bytes": int(tail), "tail_tensors": len(read),
                        "exit_max_rel_diff": rel_diff(got_exit, want_exit),
                        "upgrade_max_rel_diff": rel_diff(got_full, want_full)})
        sess.close()
        del sess, full, small, big, head
        dev.free()
    best = min(timings, key=lambda t: t["drop_s"] + t["upgrade_s"])
    res.update(best)
    res["reps"] = len(timings)
    up_s = best["upgrade_s"]
    res["upgrade_gbps"] = best["tail_bytes"] / up_s / 1e9 if up_s else None
    res["peaks"] = peaks
    return res


def step_downgrade(plan: Plan, store_root: Path, dev: Device) -> dict[str, Any]:
    import variants

    store = variants.Store(store_root)
    out = []
    for m in plan.models:
        try:
            out.append({"status": "ok", **_downgrade_one(plan, m, store, dev)})
        except Exception as e:  # noqa: BLE001 - one model failing must not lose the other
            out.append({"model": m.key, "status": _status(e), "error": _short(e),
                        "traceback": traceback.format_exc(limit=6)})
    return {"status": _worst(r["status"] for r in out), "models": out}


def step_profile(plan: Plan, store_root: Path, dev: Device) -> dict[str, Any]:
    import profiler
    import variants

    store = variants.Store(store_root)
    names = [n for m in plan.models for n in m.variants().values()]
    out = []
    for backend in plan.backends:
        usable = [n for n in names if backend != "torch" or store.get(n).weights_path]
        t = time.perf_counter()
        ms = profiler.profile(store, device=plan.device, backend=backend,
                              batches=plan.profile_batches,
                              runs=plan.runs, warmup=plan.warmup, eval="random",
                              eval_samples=plan.eval_samples, variants=usable,
                              threads=plan.threads)
        out.append({"backend": backend, "seconds": round(time.perf_counter() - t, 2),
                    "measured": len(ms),
                    "failed": [{"name": x.name, "batch": x.batch, "status": x.status,
                                "error": x.error} for x in ms if x.status != "ok"]})
    return {"status": "partial" if any(b["failed"] for b in out) else "ok", "backends": out}


def _budget_for(cands, pick) -> int:
    return int(sum(pick(c.memory_bytes for c in cs) for cs in cands.values()))


def step_serve(plan: Plan, store_root: Path, dev: Device) -> dict[str, Any]:
    import numpy as np

    import variants
    from adaptive import VariantCache
    from adaptive.cache import catalog_candidates

    store = variants.Store(store_root)
    max_batch = max(plan.profile_batches)
    cands = catalog_candidates(store, plan.device, plan.serve_backend, max_batch)
    models = sorted(cands)
    roomy = int(_budget_for(cands, max) * 1.2)
    tight = int(_budget_for(cands, min) * 1.05)
    floors = dict.fromkeys(models, 0.0)
    refs: dict[str, Any] = {}

    def reference(variant: str, feed) -> Any:
        if variant not in refs:
            sess = variants.open_session(store, variant, device=plan.device,
                                         backend=plan.serve_backend)
            refs[variant] = sess.run(feed)
            sess.close()
        return refs[variant]

    feeds = {m: inputs_for(store, store.get(cands[m][0].variant).base, 1, seed=2)
             for m in models}
    phases = []
    with VariantCache(store, device=plan.device, backend=plan.serve_backend, budget=roomy,
                      floors=floors, max_batch=max_batch, threads=plan.threads) as cache:
        for phase, budget in (("roomy", roomy), ("tight", tight), ("roomy again", roomy)):
            t = time.perf_counter()
            cache.set_budget(budget)
            set_s = time.perf_counter() - t
            served = []
            for m in models:
                r = cache.infer(m, feeds[m])
                out = np.asarray(r.output)
                served.append({"model": m, "variant": r.variant, "cold": r.cold,
                               "latency_s": r.latency_s,
                               "max_rel_diff": rel_diff(out, reference(r.variant, feeds[m]))})
            st = cache.stats()
            phases.append({"phase": phase, "budget_bytes": budget, "set_budget_s": set_s,
                           "bytes_resident": st.bytes_resident, "served": served,
                           "downgrades": st.downgrades, "upgrades": st.upgrades,
                           "evictions": st.evictions, "cold_loads": st.cold_loads})
        st = cache.stats()
        stats = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)
                 if f.name != "models"}
    return {"status": "ok", "backend": plan.serve_backend, "max_batch": max_batch,
            "candidates": {m: [dataclasses.asdict(c) for c in cs] for m, cs in cands.items()},
            "phases": phases, "stats": stats}


STEP_FUNCS = {"generate": step_generate, "bandwidth": step_bandwidth,
              "downgrade": step_downgrade, "profile": step_profile, "serve": step_serve}


# ---- the child's entry -------------------------------------------------------------------------

def _status(e: BaseException) -> str:
    return "oom" if "out of memory" in str(e).lower() else "error"


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:400]


def _worst(statuses) -> str:
    s = set(statuses)
    return "ok" if s <= {"ok"} else "error" if s == {"error"} else "partial"


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Steps in turn: ``{"plan": ..., "steps": [names], "store": folder, "deadline": t}``
    -> ``{"env": ..., "results": {step: result}}``. A step whose input failed, or that the
    deadline leaves no time for, is skipped with the reason."""
    plan = Plan.from_dict(spec["plan"])
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    out: dict[str, Any] = {"env": {}, "results": {}}
    try:
        dev = Device(plan)
        out["env"] = dev.info()
    except Exception as e:  # noqa: BLE001 - report, don't crash: the parent records it
        out["env"] = {"cuda": False} if "no usable CUDA" in str(e) else {}
        for step in spec["steps"]:
            out["results"][step] = {"status": _status(e), "error": _short(e)}
        return out
    done = dict(spec.get("done", {}))
    for step in spec["steps"]:
        missing = [n for n in NEEDS.get(step, ()) if done.get(n) not in ("ok", "partial")]
        left = spec["deadline"] - time.time()
        if missing or left < 2:
            why = f"needs {', '.join(missing)} first" if missing else "time budget"
            out["results"][step] = {"status": "skipped", "error": why}
            continue
        t = time.perf_counter()
        try:
            res = STEP_FUNCS[step](plan, Path(spec["store"]), dev)
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the others
            res = {"status": _status(e), "error": _short(e),
                   "traceback": traceback.format_exc(limit=8)}
        res["seconds"] = round(time.perf_counter() - t, 2)
        out["results"][step] = res
        done[step] = res["status"]
        dev.free()
    return out


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(Path(argv[0]).read_text())
    print(RESULT_MARK + json.dumps(run(spec), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
