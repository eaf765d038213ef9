"""Peak memory of one variant at one batch size, and a linear model of it.

Each (variant, batch) is measured in a fresh child process (``profiler._child``):
allocators keep what they freed (glibc free lists, the onnxruntime arena), so
a second batch size measured in the same process reuses the first one's memory
and reads low (ResNet-18 fp32 at batch 4 after batch 1: 150 MiB instead of the
177 MiB a fresh process needs). In the child:

- CPU: the kernel's high-water mark of resident memory (``VmHWM`` in
  ``/proc/self/status``), reset with ``echo 5 > /proc/self/clear_refs`` so the
  load transient and the inference peak are told apart; where that file cannot
  be written, a thread samples the resident size instead. Every figure is
  reported minus the baseline taken after the imports.
- CUDA: torch's allocator peak after ``reset_peak_memory_stats`` plus what the
  allocator does not see (the CUDA context, library workspaces), and, for
  onnxruntime, which has no per-session API, the process's memory in NVML
  sampled during the runs. Nothing GPU-specific is imported on the CPU path.

``getrusage(RUSAGE_CHILDREN)`` is deliberately not used: it is the maximum over
all children ever waited for, so it cannot tell variants apart.

The allocator (``allocator="pinned"``, the default): glibc raises its mmap
threshold whenever a large block is freed, so after onnxruntime has built a
session, memory it freed (the parsed model, unpacked copies) stays in the heap
and in the resident size, by an amount that depends on thread timing. Measured
here, ResNet-18 fp32 (45 MB of weights) read 125 MiB or 145 MiB static across
identical runs, and its batch-4 peak 129 or 156 MiB; with the threshold
pinned at glibc's default initial value (128 KiB) it read 51.4 MiB and
86.4 MiB every time, and the batch-1/4/8 peaks lie on a line. So the child
pins it (``MALLOC_MMAP_THRESHOLD_``), and a server that wants its memory to
match the profile pins it too, before it loads variants: set
:data:`ALLOCATOR_ENV` in its environment or call :func:`pin_allocator`.
``allocator="default"`` measures an unpinned process instead (noisier,
larger). Each result records which one it used.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from profiler.gpu import Nvml

log = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"

#: glibc's default initial mmap threshold, pinned so that it no longer moves
MMAP_THRESHOLD = 128 * 1024
#: the environment of a process whose memory matches ``allocator="pinned"`` profiles
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
ALLOCATORS = ("pinned", "default")


def allocator_env(allocator: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a measuring child under ``allocator`` ("pinned" or "default")."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")
    env = {k: v for k, v in env.items() if k not in ALLOCATOR_ENV}
    return {**env, **ALLOCATOR_ENV} if allocator == "pinned" else env


def pin_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold in this process (``mallopt``), as profiled children do.

    Call it at server start, before loading variants, so that resident memory
    follows the catalog's ``allocator="pinned"`` figures. Returns False where
    there is no glibc ``mallopt`` (musl, macOS): nothing changes there.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(mallopt(m_mmap_threshold, int(threshold)))


_LIBC: list = []


def malloc_trim() -> bool:
    """Hand free heap memory back to the OS (glibc's ``malloc_trim(0)``): after a session is
    released its pages would otherwise stay resident. False where there is no glibc."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    trim = _LIBC[0]
    return bool(trim(0)) if trim is not None else False


def _status_bytes(*keys: str) -> dict[str, int]:
    with open(_STATUS, encoding="ascii") as f:
        text = f.read()
    out = {}
    for k in keys:
        m = re.search(rf"^{k}:\s+(\d+) kB", text, re.MULTILINE)
        if m:
            out[k] = int(m.group(1)) * 1024
    return out


def _can_clear_refs() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
        return "VmHWM" in _status_bytes("VmHWM")
    except OSError:
        return False


class PeakMeter:
    """Resident memory of this process now and its peak since the last :meth:`reset`.

    ``method`` says how the peak is known: ``"vmhwm"`` (exact, from the kernel)
    or ``"sampled"`` (a thread reading the resident size every ``interval_s``,
    which can miss a spike shorter than the interval).
    """

    def __init__(self, interval_s: float = 0.001):
        self.method = "vmhwm" if _can_clear_refs() else "sampled"
        self._interval = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.method == "sampled":
            import psutil

            self._proc = psutil.Process()
            self._peak = self.rss()
            self._thread = threading.Thread(target=self._sample, name="peak-meter", daemon=True)
            self._thread.start()

    def rss(self) -> int:
        if self.method == "vmhwm":
            return _status_bytes("VmRSS")["VmRSS"]
        return int(self._proc.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self.rss())

    def reset(self) -> None:
        if self.method == "vmhwm":
            with open(_CLEAR_REFS, "w", encoding="ascii") as f:
                f.write("5")
        else:
            self._peak = self.rss()

    def peak(self) -> int:
        if self.method == "vmhwm":
            return _status_bytes("VmHWM")["VmHWM"]
        self._peak = max(self._peak, self.rss())
        return self._peak

    def close(self) -> None:
        self._stop.set()


class CudaMeter:
    """GPU memory of this process on one device (used by the child on ``cuda``).

    With torch (``torch=True``) the allocator's own counters are exact and NVML
    only adds what the allocator does not own (context, cuDNN/cuBLAS
    workspaces); onnxruntime gives no per-session figure, so the process's NVML
    memory is sampled while it runs.
    """

    def __init__(self, index: int, pid: int, *, torch: bool, interval_s: float = 0.005):
        self.index, self.pid, self.use_torch = index, pid, torch
        self.method = "torch+nvml" if torch else "nvml"
        self._nvml = Nvml(index)
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval = interval_s

    def process_bytes(self) -> int:
        return self._nvml.process_bytes(self.pid)

    def _torch(self):
        import torch

        return torch.cuda

    def reset(self) -> None:
        if self.use_torch:
            self._torch().synchronize(self.index)
            self._torch().reset_peak_memory_stats(self.index)
        else:
            self._peak = self.process_bytes()
            if self._thread is None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self.process_bytes())

    def current(self) -> int:
        if self.use_torch:
            cuda = self._torch()
            outside = max(0, self.process_bytes() - cuda.memory_reserved(self.index))
            return outside + cuda.memory_allocated(self.index)
        return self.process_bytes()

    def peak(self) -> int:
        if self.use_torch:
            cuda = self._torch()
            cuda.synchronize(self.index)
            outside = max(0, self.process_bytes() - cuda.memory_reserved(self.index))
            return outside + cuda.max_memory_allocated(self.index)
        self._peak = max(self._peak, self.process_bytes())
        return self._peak

    def close(self) -> None:
        self._stop.set()


@dataclass(frozen=True)
class MemoryFit:
    """``memory(batch) = static + per_sample * batch``, fitted by least squares.

    ``residual_bytes`` is the root-mean-square error of the fit on the batches
    it was fitted to (0 when there are only two: a line through two points is
    exact, so only a third, unfitted batch tests it).
    """

    static_bytes: float
    per_sample_bytes: float
    residual_bytes: float
    batches: tuple[int, ...]

    def predict(self, batch: int) -> int:
        return int(round(self.static_bytes + self.per_sample_bytes * batch))


def fit_memory(points: Sequence[tuple[int, int]], static_bytes: int | None = None
               ) -> MemoryFit | None:
    """Fit (batch, peak bytes) points. With one batch size only, the line goes through
    the measured static memory (``static_bytes``) and that point; with none, ``None``."""
    pts = sorted((int(b), int(m)) for b, m in points if m is not None)
    if not pts:
        return None
    batches = tuple(b for b, _ in pts)
    if len(set(batches)) == 1:
        if static_bytes is None:
            return None
        b, m = pts[0]
        return MemoryFit(float(static_bytes), (m - static_bytes) / b, 0.0, batches)
    import numpy as np

    x = np.array([[1.0, b] for b, _ in pts])
    y = np.array([float(m) for _, m in pts])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    rms = math.sqrt(float(np.mean(resid ** 2)))
    return MemoryFit(float(coef[0]), float(coef[1]), rms, batches)


_OOM_MARKERS = ("out of memory", "bad_alloc", "failed to allocate", "memoryerror",
                "cannot allocate memory", "cudaerrormemoryallocation")


def is_oom(text: str) -> bool:
    """Whether an error message means the device ran out of memory."""
    low = text.lower()
    return any(m in low for m in _OOM_MARKERS)



_TIME_V_IMPORTS = "import numpy as np, onnxruntime as ort, variants, profiler\n"
_TIME_V_RUN = _TIME_V_IMPORTS + (
    "import sys\n"
    "so = ort.SessionOptions()\n"
    "so.enable_cpu_mem_arena = False  # as memadapt's sessions run (variants.backends)\n"
    "if sys.argv[2] == '1':  # a graph optimised already: opened as memadapt opens it\n"
    "    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL\n"
    "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
    "x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)\n"
    "for _ in range(3): s.run(None, {'input': x})\n")


def _time_v_max_rss(code: str, *args: str) -> int:
    import os
    import sys

    if shutil.which("/usr/bin/time") is None:
        raise FileNotFoundError("the cross-check needs GNU /usr/bin/time (apt-get install time)")
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *args],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, **ALLOCATOR_ENV})
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if m is None:
        raise RuntimeError(f"/usr/bin/time printed no maximum RSS: {proc.stderr[-500:]}")
    return int(m.group(1)) * 1024


def independent_peak(onnx_path: str, *, optimized: bool = False) -> int:
    """Cross-check of the profiler with none of its machinery: ``/usr/bin/time -v``'s max RSS
    of a process that only loads an image model's ONNX file with onnxruntime and runs it at
    batch 1 (224x224), minus that of a process doing the same imports alone. ``optimized``:
    the file is a graph onnxruntime optimised already (``variants.ort_forms``), opened with
    optimisation off, as the onnxruntime backend opens it."""
    return (_time_v_max_rss(_TIME_V_RUN, str(onnx_path), "1" if optimized else "0")
            - _time_v_max_rss(_TIME_V_IMPORTS))
