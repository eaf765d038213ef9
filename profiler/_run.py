"""``profile()``: measure a store's variants and write the catalog as results complete."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiler.accuracy import BUILTIN_EVAL_SETS, Evaluator, resolve_eval
from profiler.catalog import Catalog
from profiler.device import DeviceInfo, device_info
from profiler.errors import ProfilerDataError, ProfilerError
from profiler.memory import ALLOCATORS, allocator_env, fit_memory
from variants._locks import DEFAULT_TIMEOUT
from variants.backends import list_backends, parse_device
from variants.errors import StoreError
from variants.families import get_family
from variants.store import Manifest, Store

log = logging.getLogger(__name__)

#: progress(description, done, total): description is the variant's name, done/total
#: count its steps (one per batch size, plus one for accuracy)
Progress = Callable[[str, int, int], None]

_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Measurement:
    """What :func:`profile` did for one (variant, batch) or one variant's accuracy."""

    variant: str
    key: str
    kind: str  # "batch" or "accuracy"
    batch: int | None
    eval_set: str | None
    status: str  # "ok", "oom", "error" or "skipped" (already in the catalog)
    seconds: float
    error: str | None = None


def _select(store: Store, variants: str | Sequence[str]) -> list[Manifest]:
    if isinstance(variants, str):
        names = store.names(variants)
        if not names:
            raise ProfilerError(f"no variant in {store.root} matches {variants!r}; stored: "
                                f"{', '.join(store.names()) or 'none (run memadapt generate)'}")
    else:
        names = list(dict.fromkeys(variants))
        missing = [n for n in names if n not in store]
        if missing:
            raise ProfilerError(f"variants {missing} are not in {store.root}; stored: "
                                f"{', '.join(store.names())}")
    ms = [store.get(n) for n in names]
    # bases first, so their outputs are at hand for their variants' fidelity
    return sorted(ms, key=lambda m: (m.base, len(m.specs), m.name))


def _check_args(device: str, backend: str, batches: Sequence[int], runs: int, warmup: int,
                eval_set: str | None) -> tuple[int, ...]:
    parse_device(device)
    if backend not in list_backends():
        raise ProfilerError(f"unknown backend {backend!r}; known: {', '.join(list_backends())}")
    bs = tuple(sorted({int(b) for b in batches}))
    if not bs or any(b < 1 for b in bs) or any(isinstance(b, bool) for b in batches):
        raise ProfilerError(f"batches must be positive integers, got {tuple(batches)!r}")
    if runs < 1 or warmup < 0:
        raise ProfilerError(f"need runs >= 1 and warmup >= 0 (got runs={runs}, "
                            f"warmup={warmup})")
    if eval_set is not None and eval_set not in BUILTIN_EVAL_SETS and not Path(eval_set).exists():
        raise ProfilerDataError(f"eval set {eval_set!r} is neither one of "
                                f"{', '.join(BUILTIN_EVAL_SETS)} nor an existing file or "
                                f"folder")
    return bs


def profile(store: Store | str | Path, *, device: str = "cpu", backend: str = "onnxruntime",
            batches: Sequence[int] = (1, 8), runs: int = 20, warmup: int = 3,
            eval: str | None = "auto", variants: str | Sequence[str] = "*",
            threads: int | None = None, force: bool = False, progress: Progress | None = None,
            eval_samples: int = 512, timeout: float = 900.0,
            allocator: str = "pinned", lock_timeout: float | None = DEFAULT_TIMEOUT
            ) -> list[Measurement]:
    """Profile the store's variants on ``device`` and record the results in its catalog.

    Per batch size, each variant runs in a fresh child process that measures
    memory, latency and load time; accuracy and fidelity are measured once
    per variant (``eval``: see :mod:`profiler.accuracy`). Each result is
    committed as soon as it is known, so an interrupted run keeps its work,
    and a re-run skips what is stored (``force=True`` measures again). A
    variant that fails to load or runs out of memory is recorded with its
    status and error text, and profiling goes on. ``warmup`` counts the
    first (cold) run; ``timeout`` bounds each child in seconds; ``allocator``
    ("pinned" or "default") is the glibc setting of the measuring process (see
    :mod:`profiler.memory` for why pinned is the default). Profile runs on one store take
    turns (:meth:`~variants.Store.profile_lock`): a second run waits up to ``lock_timeout``
    seconds, then raises :class:`~variants.StoreLockedError` naming the first.
    """
    store = store if isinstance(store, Store) else Store(store)
    bs = _check_args(device, backend, batches, runs, warmup, eval)
    if allocator not in ALLOCATORS:
        raise ProfilerError(f"allocator must be one of {', '.join(ALLOCATORS)}, "
                            f"got {allocator!r}")
    _select(store, variants)  # bad names fail now, not after waiting for the lock
    info = device_info(device)
    evaluator = Evaluator(store, device=device, backend=backend, threads=threads,
                          samples=eval_samples)
    results: list[Measurement] = []
    with store.profile_lock(f"profile {device}/{backend}", timeout=lock_timeout), \
            Catalog(store.catalog_path) as cat:
        manifests = _select(store, variants)  # as stored once our turn came
        cat.record_device(info)
        done = set() if force else cat.done_batches(info.fingerprint, backend, allocator)
        done_acc = set() if force else cat.done_accuracy(info.type, backend)
        for m in manifests:
            results += _profile_variant(
                store, m, cat, info, backend=backend, batches=bs, runs=runs, warmup=warmup,
                eval_set=resolve_eval(eval, m), threads=threads, done=done, done_acc=done_acc,
                evaluator=evaluator, progress=progress, timeout=timeout, device=device,
                allocator=allocator)
        if eval is not None:
            from profiler.groups import measure_group_fidelity

            measure_group_fidelity(store, cat, evaluator, device_type=info.type,
                                   backend=backend, force=force)
    return results


def _profile_variant(store: Store, m: Manifest, cat: Catalog, info: DeviceInfo, *,
                     backend: str, batches: tuple[int, ...], runs: int, warmup: int,
                     eval_set: str | None, threads: int | None, done: set, done_acc: set,
                     evaluator: Evaluator, progress: Progress | None, timeout: float,
                     device: str, allocator: str) -> list[Measurement]:
    total = len(batches) + (1 if eval_set else 0)
    step = 0

    def tick() -> None:
        if progress:
            progress(m.name, step, total)

    tick()
    out: list[Measurement] = []
    load_error: str | None = None
    todo = [b for b in batches if (m.key, b) not in done]
    todo_acc = eval_set is not None and (m.key, eval_set) not in done_acc
    if todo or todo_acc:
        try:
            store.verify(m.name)
        except StoreError as e:
            load_error = str(e)
            log.warning("%s cannot be profiled: %s", m.name, e)
    if todo and not load_error and backend == "onnxruntime":
        _prepare_optimized(m, device)
    base_row = {"variant_key": m.key, "variant": m.name, "device_fp": info.fingerprint,
                "device_type": info.type, "backend": backend}
    for b in batches:
        if b not in todo:
            out.append(Measurement(m.name, m.key, "batch", b, None, "skipped", 0.0))
        else:
            t0 = time.perf_counter()
            if load_error:
                row = {"status": "error", "error": load_error}
            else:
                row = run_child(store, m, b, device=device, backend=backend, runs=runs,
                                warmup=warmup, threads=threads, timeout=timeout,
                                allocator=allocator)
            row["seconds"] = time.perf_counter() - t0
            row["allocator"] = allocator
            cat.upsert_batch({**base_row, "batch": b, **row})
            log.info("%s batch %d: %s (peak %s bytes, p50 %s s)", m.name, b, row["status"],
                     row.get("peak_memory_bytes"), row.get("latency_p50_s"))
            out.append(Measurement(m.name, m.key, "batch", b, None, row["status"],
                                   row["seconds"], row.get("error")))
        step += 1
        tick()
    # also when nothing was measured: a run killed between its last batch and the fit
    # left the rows without their fit
    if todo or m.key not in cat.fits(info.fingerprint, backend):
        _refit(cat, m.key, info.fingerprint, backend)
    if eval_set is not None:
        out.append(_accuracy(cat, m, base_row, eval_set, evaluator, load_error, todo_acc))
        step += 1
        tick()
    return out


def _prepare_optimized(m: Manifest, device: str) -> None:
    """Make the variant's optimised graph for ``device`` before the child times a load from
    it (its one-off cost is not a load's)."""
    from variants.errors import BackendError
    from variants.ort_forms import optimized_graph

    try:
        optimized_graph(m, device)
    except BackendError as e:  # the child's load fails the same way and records it
        log.warning("%s: no optimised graph for %s: %s", m.name, device, e)


def _refit(cat: Catalog, key: str, fp: str, backend: str) -> None:
    """Fit memory(batch) over every batch size of this variant measured so far."""
    ok = [r for r in cat.batch_rows(fp, backend, [key])
          if r["status"] == "ok" and r["peak_memory_bytes"] is not None]
    static = ok[0]["static_memory_bytes"] if ok else None
    cat.upsert_fit(key, fp, backend,
                   fit_memory([(r["batch"], r["peak_memory_bytes"]) for r in ok], static))


def _accuracy(cat: Catalog, m: Manifest, base_row: dict, eval_set: str, evaluator: Evaluator,
              load_error: str | None, todo: bool) -> Measurement:
    if not todo:
        return Measurement(m.name, m.key, "accuracy", None, eval_set, "skipped", 0.0)
    row = {k: v for k, v in base_row.items() if k != "device_fp"}
    row.update(eval_set=eval_set, device_fp=base_row["device_fp"])
    t0 = time.perf_counter()
    if load_error:
        row.update(status="error", error=load_error)
    else:
        try:
            r = evaluator.evaluate(m, eval_set)
            row.update(status="ok", error=None, samples=r.samples, accuracy=r.accuracy,
                       fidelity=r.fidelity, fidelity_metric=r.fidelity_metric)
        except Exception as e:  # noqa: BLE001 - recorded, and profiling goes on
            log.warning("%s: accuracy on %s failed: %s", m.name, eval_set, e)
            row.update(status="error", error=f"{type(e).__name__}: {e}")
    row["seconds"] = time.perf_counter() - t0
    cat.upsert_accuracy(row)
    log.info("%s on %s: accuracy %s, fidelity %s", m.name, eval_set, row.get("accuracy"),
             row.get("fidelity"))
    return Measurement(m.name, m.key, "accuracy", None, eval_set, row["status"],
                       row["seconds"], row.get("error"))


def _inputs(m: Manifest, batch: int, path: Path) -> None:
    """Write the serving-shape inputs of ``m`` at ``batch`` for the child (it imports no torch)."""
    import numpy as np

    fam = get_family(m.family)
    tensors = fam.example_inputs(m.arch, batch, seed=0)
    names = [i["name"] for i in m.inputs]
    np.savez(path, **{n: t.numpy() for n, t in zip(names, tensors)})


def run_child(store: Store, m: Manifest, batch: int, *, device: str, backend: str, runs: int,
              warmup: int, threads: int | None, timeout: float,
              allocator: str = "pinned") -> dict[str, Any]:
    """Measure ``m`` at ``batch`` in a fresh process; returns catalog columns."""
    import json

    with tempfile.TemporaryDirectory(prefix="memadapt-profile-") as tmp:
        tmpd = Path(tmp)
        try:
            _inputs(m, batch, tmpd / "inputs.npz")
        except Exception as e:  # noqa: BLE001 - a family that cannot make inputs is recorded
            return {"status": "error", "error": f"cannot build inputs: {type(e).__name__}: {e}"}
        req = {"store": str(store.root), "name": m.name, "onnx": str(m.onnx_path),
               "family": m.family, "batch": batch, "device": device, "backend": backend,
               "threads": threads, "runs": runs, "warmup": warmup,
               "inputs": str(tmpd / "inputs.npz"), "result": str(tmpd / "result.json")}
        (tmpd / "request.json").write_text(json.dumps(req), encoding="utf-8")
        env = allocator_env(allocator, dict(os.environ))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH"))
                                            if p)
        cmd = [sys.executable, "-m", "profiler._child", str(tmpd / "request.json")]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout:g} s"}
        result_path = tmpd / "result.json"
        if result_path.is_file():
            res = json.loads(result_path.read_text(encoding="utf-8"))
        else:
            res = {"status": "error", "error": _died(proc)}
            if proc.returncode == -signal.SIGKILL:
                res["status"] = "oom"
    res.pop("phase", None)
    res.pop("pid", None)
    if res.get("traceback"):
        log.debug("%s batch %d failed in the child:\n%s", m.name, batch, res["traceback"])
    res.pop("traceback", None)
    return res


def _died(proc: subprocess.CompletedProcess) -> str:
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    if proc.returncode is not None and proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = " (likely the kernel's out-of-memory killer)" if sig == "SIGKILL" else ""
        return f"measurement process killed by {sig}{why}"
    return f"measurement process exited with {proc.returncode}: {' | '.join(tail)}"
