"""Latency of one variant at one batch size: warm-up, then timed runs.

Runs in the same child process as the memory measurement, after it, so one
process start and one session load serve both. Warm-up runs are not timed:
the first runs of a session allocate its arena and pick kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LatencyStats:
    """Seconds per batch over ``runs`` timed runs; ``throughput`` in samples per second."""

    batch: int
    runs: int
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    std_s: float
    throughput: float
    threads: int

    @classmethod
    def from_times(cls, times: list[float], batch: int, threads: int) -> LatencyStats:
        import numpy as np

        t = np.asarray(times, dtype=np.float64)
        if t.size == 0:
            raise ValueError("no timed runs")
        p50, p95, p99 = (float(v) for v in np.percentile(t, [50, 95, 99]))
        mean = float(t.mean())
        return cls(batch, int(t.size), p50, p95, p99, mean, float(t.std()),
                   batch / mean if mean > 0 else float("inf"), threads)


def time_runs(run: Callable[[], Any], *, batch: int, runs: int, warmup: int, threads: int,
              sync: Callable[[], None] | None = None,
              clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Call ``run`` ``warmup`` times untimed, then ``runs`` times timed.

    ``sync`` (``torch.cuda.synchronize`` on CUDA) is called before each clock
    read so asynchronous kernels are inside the run they belong to.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        run()
    if sync:
        sync()
    times = []
    for _ in range(runs):
        t0 = clock()
        run()
        if sync:
            sync()
        times.append(clock() - t0)
    return LatencyStats.from_times(times, batch, threads)
