"""The isolated measurement process: one variant at one batch size.

``python -m profiler._child REQUEST.json`` loads the variant in a fresh
process, measures memory (baseline after imports, static after the session
is built, peak while it runs), latency (warm-up + timed runs, the same runs
the peak is taken over), cold load (file to first finished inference, through the
backend's load path: for onnxruntime the graph optimised once for this device, opened
with optimisation off) and warm load (from the backend's host form, what a cache's host
tier keeps, to first finished inference), and writes a JSON result to the path named in
the request. A fresh process per
measurement keeps variants (and batch sizes) from sharing allocator state.

Everything the child imports is imported before the baseline is taken, so
that import cost is not charged to the variant.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _preimport(backend: str, family: str, cuda: bool) -> None:
    """Import what building the session would import lazily, before the baseline."""
    import numpy  # noqa: F401

    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    elif backend == "torch":
        import safetensors.torch  # noqa: F401
        import torch

        if family == "resnet":
            import torchvision  # noqa: F401
        elif family == "bert":
            import transformers  # noqa: F401
        if cuda:
            torch.cuda.init()


def _write(path: str, result: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def measure(req: dict[str, Any], result: dict[str, Any]) -> None:
    """Fill ``result`` step by step, so a failure keeps what was measured before it."""
    from variants.backends import default_threads, parse_device

    kind, index = parse_device(req["device"])
    cuda = kind == "cuda"
    backend = req["backend"]
    result["phase"] = "import"
    _preimport(backend, req["family"], cuda)
    import numpy as np

    from profiler.latency import time_runs
    from profiler.memory import CudaMeter, PeakMeter
    from variants.backends import open_session

    threads = req.get("threads")
    result["threads"] = int(threads or default_threads())
    if req["backend"] == "torch" and threads:
        import torch  # this child owns its process: torch's threads are process-wide

        torch.set_num_threads(int(threads))
    meter: Any = CudaMeter(index, os.getpid(), torch=backend == "torch") if cuda \
        else PeakMeter()
    result["memory_method"] = meter.method
    gc.collect()
    meter.reset()
    # A process holds no GPU memory before it touches the device, so on CUDA the
    # baseline is zero and the context (which the allocator does not count) is
    # charged to the variant, as a process serving only this variant would pay it.
    baseline = 0 if cuda else meter.rss()
    result["baseline_bytes"] = baseline

    result["phase"] = "load"
    t0 = time.perf_counter()
    session = open_session(req["store"], req["name"], device=req["device"], backend=backend,
                           threads=threads, verify=False)
    t_build = time.perf_counter() - t0
    result["static_memory_bytes"] = (meter.current() if cuda else meter.rss()) - baseline
    result["load_peak_bytes"] = meter.peak() - baseline

    result["phase"] = "infer"
    meter.reset()
    with np.load(req["inputs"], allow_pickle=False) as z:
        inputs = {k: z[k] for k in z.files}
    sync = None
    if cuda and backend == "torch":
        import torch

        def sync() -> None:
            torch.cuda.synchronize(index)

    t1 = time.perf_counter()
    session.run(inputs)
    if sync:
        sync()
    result["load_cold_s"] = t_build + (time.perf_counter() - t1)
    stats = time_runs(lambda: session.run(inputs), batch=req["batch"], runs=req["runs"],
                      warmup=max(0, req["warmup"] - 1), threads=result["threads"], sync=sync)
    result["peak_memory_bytes"] = meter.peak() - baseline
    meter.close()
    result.update({"latency_p50_s": stats.p50_s, "latency_p95_s": stats.p95_s,
                   "latency_p99_s": stats.p99_s, "latency_mean_s": stats.mean_s,
                   "latency_std_s": stats.std_s, "throughput": stats.throughput,
                   "runs": stats.runs})

    result["phase"] = "warm load"
    session.close()
    session = None  # the warm load must not share the first session's memory
    gc.collect()
    t2, warm = _warm_load(req, inputs, threads)
    result["load_warm_s"] = warm - t2
    result["phase"] = "done"
    result["status"] = "ok"


def _warm_load(req, inputs, threads) -> tuple[float, float]:
    """Time a re-load from the backend's host form (what a cache's host tier keeps:
    :func:`variants.backends.host_form`) through its first run."""
    from variants.backends import get_backend, host_form
    from variants.store import Store

    manifest = Store(req["store"]).get(req["name"])
    form = host_form(manifest, req["backend"], req["device"])
    t = time.perf_counter()
    session = get_backend(req["backend"])(manifest, device=req["device"], threads=threads,
                                          source=form)
    session.run(inputs)
    done = time.perf_counter()
    session.close()
    return t, done


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    req = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result: dict[str, Any] = {"status": "error", "pid": os.getpid()}
    try:
        measure(req, result)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a recorded result
        from profiler.memory import is_oom

        text = f"{type(e).__name__}: {e}"
        result["status"] = "oom" if isinstance(e, MemoryError) or is_oom(text) else "error"
        result["error"] = f"{text} (while: {result.get('phase', 'start')})"
        result["traceback"] = traceback.format_exc(limit=8)
    _write(req["result"], result)
    return 0 if result["status"] == "ok" else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
