"""What only a GPU run needs: GPU memory from the driver (NVML) and copy bandwidth.

- :class:`Nvml`: a process's GPU memory and the device's used memory, through pynvml
  when installed, else ``nvidia-smi``. torch's allocator does not see the CUDA context
  or the library workspaces and onnxruntime has no per-session figure, so the
  profiler's CUDA meter (:class:`profiler.memory.CudaMeter`) reads the driver too.
- :func:`copy_bandwidth`: host-to-device copy bandwidth from pinned (and pageable)
  memory, best of a few copies: the physical floor of bringing a variant back from a
  host tier. On ``cpu`` it is a host memcpy (``numpy.copyto`` into a preallocated
  array), the same floor for a CPU server (DESIGN.md).

Importing this module imports neither torch nor pynvml.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import asdict, dataclass

MiB = 1 << 20


class Nvml:
    """GPU memory of device ``index`` as the driver reports it: pynvml, else nvidia-smi.

    Raises RuntimeError when neither is available: a silent zero would read as "this
    variant needs no GPU memory"."""

    def __init__(self, index: int):
        self.index = index
        self._pynvml = None
        self._smi: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
            self.source = "nvml"
        except Exception:  # noqa: BLE001 - missing module or no driver: fall back
            self._smi = shutil.which("nvidia-smi")
            if self._smi is None:
                raise RuntimeError("cannot read per-process GPU memory: neither pynvml "
                                   "(pip install nvidia-ml-py) nor nvidia-smi is available") \
                    from None
            self.source = "nvidia-smi"

    def _query(self, what: str) -> str:
        return subprocess.run([self._smi, what, "--format=csv,noheader,nounits", "-i",
                               str(self.index)], capture_output=True, text=True,
                              timeout=30).stdout

    def process_bytes(self, pid: int) -> int:
        """GPU memory the driver charges to process ``pid`` on this device (0 if none;
        some virtualised GPUs report no per-process figure)."""
        if self._pynvml is not None:
            procs = self._pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
            return int(sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid))
        total = 0
        for line in self._query("--query-compute-apps=pid,used_memory").splitlines():
            p, _, mib = line.partition(",")
            if p.strip() == str(pid) and mib.strip().isdigit():
                total += int(mib) * MiB
        return total

    def device_used(self) -> int:
        """Memory in use on the device, by every process."""
        if self._pynvml is not None:
            return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        return int(self._query("--query-gpu=memory.used").strip() or 0) * MiB


@dataclass(frozen=True)
class CopyBandwidth:
    """Best-of-``reps`` copy of ``nbytes``: ``gbps`` from pinned memory (CUDA) or a host
    memcpy (CPU); ``pageable_gbps`` from ordinary host memory (CUDA only)."""

    device: str
    method: str
    nbytes: int
    reps: int
    best_s: float
    gbps: float
    pageable_gbps: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _best(fn, reps: int) -> float:
    fn()  # first copy: page faults, lazy allocation
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 * MiB, reps: int = 5) -> CopyBandwidth:
    """Measure the copy that restoring a variant from host memory cannot beat."""
    if reps < 1 or nbytes < 1:
        raise ValueError(f"need reps >= 1 and nbytes >= 1, got reps={reps}, nbytes={nbytes}")
    if device == "cpu":
        import numpy as np

        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        best = _best(lambda: np.copyto(dst, src), reps)
        return CopyBandwidth(device, "host memcpy (numpy.copyto)", nbytes, reps, best,
                             nbytes / best / 1e9)
    import torch

    dev = torch.device(device)
    pinned = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    def copy(src) -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)

    best = _best(lambda: copy(pinned), reps)
    best_pageable = _best(lambda: copy(pageable), reps)
    return CopyBandwidth(device, f"pinned host -> {device} (copy_, non_blocking)", nbytes, reps,
                         best, nbytes / best / 1e9, nbytes / best_pageable / 1e9)
