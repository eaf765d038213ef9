"""Request and memory-budget traces: CSV files and seeded synthetic generators.

A request trace says *when* *which* model is asked for; a budget trace says how much memory the
cache may use from a given time on. Both are plain CSV so that traces recorded from a real
server, converted from public datasets or written by hand all feed the same simulator.

Errors name the file and the line, because a trace with a million rows is useless to debug from
"could not convert string to float".
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptive.errors import AdaptiveError
from variants.registry import Registry

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ("timestamp_s", "model", "batch")
BUDGET_COLUMNS = ("timestamp_s", "budget_bytes")


class TraceError(AdaptiveError, ValueError):
    """A trace is malformed; the message names the file and line (or request index)."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = ""
        if path is not None and line is not None:
            where = f"{path}:{line}: "
        elif path is not None:
            where = f"{path}: "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + message)


def _frozen_array(values: Any, dtype: Any) -> np.ndarray:
    arr = np.array(values, dtype=dtype, copy=True)
    if arr.ndim != 1:
        raise TraceError(f"expected a 1-D array, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TraceError(f"model names must be non-empty strings, got {name!r}")
    if any(ch in name for ch in "\r\n"):
        raise TraceError(f"model name {name!r} contains a line break")
    return name


@dataclass(frozen=True, eq=False)
class RequestTrace:
    """Requests sorted by time: ``timestamps[i]`` asks for ``models[model[i]]`` with ``batch[i]``.

    Model indices (int32) instead of strings keep a million requests at 16 MB and let the
    simulator and generators stay vectorised. ``models`` may list names that no request uses
    (an idle model is still part of the population).
    """

    timestamps: np.ndarray
    model: np.ndarray
    batch: np.ndarray
    models: tuple[str, ...]
    source: str | None = field(default=None)

    def __post_init__(self) -> None:
        ts = _frozen_array(self.timestamps, np.float64)
        mi = _frozen_array(self.model, np.int32)
        ba = _frozen_array(self.batch, np.int32)
        names = tuple(_check_name(n) for n in self.models)
        if not (len(ts) == len(mi) == len(ba)):
            raise TraceError(f"timestamps, model and batch lengths differ: "
                             f"{len(ts)}, {len(mi)}, {len(ba)}", path=self.source)
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise TraceError(f"duplicate model names {dup}", path=self.source)
        if len(ts):
            bad = ~np.isfinite(ts) | (ts < 0)
            if bad.any():
                i = int(np.argmax(bad))
                raise TraceError(f"request #{i}: timestamp {ts[i]!r} must be finite and >= 0",
                                 path=self.source)
            down = np.diff(ts) < 0
            if down.any():
                i = int(np.argmax(down)) + 1
                raise TraceError(f"request #{i}: timestamp {ts[i]!r} is earlier than the one "
                                 f"before it ({ts[i - 1]!r}); sort the trace by time",
                                 path=self.source)
            out = (mi < 0) | (mi >= len(names))
            if out.any():
                i = int(np.argmax(out))
                raise TraceError(f"request #{i}: model index {mi[i]} is outside "
                                 f"0..{len(names) - 1}", path=self.source)
            if (ba < 1).any():
                i = int(np.argmax(ba < 1))
                raise TraceError(f"request #{i}: batch {ba[i]} must be >= 1", path=self.source)
        object.__setattr__(self, "timestamps", ts)
        object.__setattr__(self, "model", mi)
        object.__setattr__(self, "batch", ba)
        object.__setattr__(self, "models", names)

    @classmethod
    def from_names(cls, timestamps: Sequence[float], names: Sequence[str],
                   batch: Sequence[int] | None = None, *, models: Sequence[str] | None = None,
                   source: str | None = None) -> RequestTrace:
        """Build a trace from one model name per request.

        ``models`` fixes the index order (and may add idle models); by default models are
        numbered in order of first appearance.
        """
        order: dict[str, int] = {n: k for k, n in enumerate(models)} if models is not None else {}
        if models is None:
            for n in names:
                order.setdefault(n, len(order))
        try:
            idx = [order[n] for n in names]
        except KeyError as e:
            raise TraceError(f"model {e.args[0]!r} is not in models={list(order)}",
                             path=source) from None
        if batch is None:
            batch = np.ones(len(idx), dtype=np.int32)
        return cls(np.asarray(timestamps, dtype=np.float64), np.asarray(idx, dtype=np.int32),
                   np.asarray(batch, dtype=np.int32), tuple(order), source)

    def __len__(self) -> int:
        return len(self.timestamps)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestTrace):
            return NotImplemented
        return (self.models == other.models
                and np.array_equal(self.timestamps, other.timestamps)
                and np.array_equal(self.model, other.model)
                and np.array_equal(self.batch, other.batch))

    __hash__ = None  # type: ignore[assignment]  # arrays: equality by value, so unhashable

    @property
    def duration_s(self) -> float:
        """Time of the last request (traces start at 0 by convention)."""
        return float(self.timestamps[-1]) if len(self) else 0.0

    def counts(self) -> np.ndarray:
        """Requests per model, aligned with :attr:`models`."""
        return np.bincount(self.model, minlength=len(self.models))

    def names(self) -> np.ndarray:
        """The model name of every request (an object array; for inspection, not hot loops)."""
        return np.asarray(self.models, dtype=object)[self.model]


@dataclass(frozen=True, eq=False)
class BudgetTrace:
    """A step function: from ``timestamps[k]`` on the cache may hold ``budget_bytes[k]`` bytes.

    The first value also applies before its own timestamp, so every trace defines the budget at
    time 0 and a one-row trace is a constant budget.
    """

    timestamps: np.ndarray
    budget_bytes: np.ndarray
    source: str | None = field(default=None)

    def __post_init__(self) -> None:
        ts = _frozen_array(self.timestamps, np.float64)
        bb = _frozen_array(self.budget_bytes, np.int64)
        if len(ts) != len(bb):
            raise TraceError(f"timestamps and budget_bytes lengths differ: {len(ts)}, {len(bb)}",
                             path=self.source)
        if len(ts) == 0:
            raise TraceError("a budget trace needs at least one row", path=self.source)
        if (~np.isfinite(ts) | (ts < 0)).any():
            raise TraceError("budget timestamps must be finite and >= 0", path=self.source)
        if (np.diff(ts) <= 0).any():
            i = int(np.argmax(np.diff(ts) <= 0)) + 1
            raise TraceError(f"budget row #{i}: timestamp {ts[i]!r} is not after the previous "
                             f"one ({ts[i - 1]!r}); budget timestamps must strictly increase",
                             path=self.source)
        if (bb < 0).any():
            raise TraceError("budget_bytes must be >= 0", path=self.source)
        object.__setattr__(self, "timestamps", ts)
        object.__setattr__(self, "budget_bytes", bb)

    @classmethod
    def constant(cls, budget_bytes: int) -> BudgetTrace:
        """A budget that never changes."""
        return cls(np.zeros(1), np.array([int(budget_bytes)]))

    def __len__(self) -> int:
        return len(self.timestamps)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BudgetTrace):
            return NotImplemented
        return (np.array_equal(self.timestamps, other.timestamps)
                and np.array_equal(self.budget_bytes, other.budget_bytes))

    __hash__ = None  # type: ignore[assignment]

    def at(self, t: float) -> int:
        """The budget in force at time ``t``."""
        k = int(np.searchsorted(self.timestamps, t, side="right")) - 1
        return int(self.budget_bytes[max(k, 0)])


# ---------------------------------------------------------------------------------------------
# CSV


def _header(reader: Any, path: str, required: Sequence[str],
            optional: Sequence[str] = ()) -> tuple[dict[str, int], int]:
    """Column positions by name, and the header's width (every row must have that many)."""
    header = next(reader, None)
    if header is None:
        raise TraceError(f"empty file; expected a header {','.join(required)}", path=path, line=1)
    cols = [h.strip() for h in header]
    missing = [c for c in required if c not in cols]
    if missing:
        raise TraceError(f"missing column(s) {missing} in header {cols}; expected "
                         f"{','.join(required)}" + (f"[,{','.join(optional)}]" if optional else ""),
                         path=path, line=1)
    extra = [c for c in cols if c not in required and c not in optional]
    if extra:
        log.debug("%s: ignoring extra column(s) %s", path, extra)
    return {c: cols.index(c) for c in (*required, *optional) if c in cols}, len(cols)


def _rows(reader: Any, path: str, width: int) -> Iterable[tuple[int, list[str]]]:
    """Yield (line, row); blank lines are allowed only at the end (row k is line k+2)."""
    blank_at: int | None = None
    for row in reader:
        line = reader.line_num
        if not row or all(not f.strip() for f in row):
            blank_at = blank_at or line
            continue
        if blank_at is not None:
            raise TraceError("blank line inside the trace; remove it", path=path, line=blank_at)
        if len(row) != width:
            raise TraceError(f"expected {width} fields, got {len(row)}: {row!r}",
                             path=path, line=line)
        yield line, row


def _timestamp(text: str, path: str, line: int, prev: float, strict: bool) -> float:
    try:
        t = float(text)
    except ValueError:
        raise TraceError(f"timestamp_s {text!r} is not a number", path=path, line=line) from None
    if not math.isfinite(t) or t < 0:
        raise TraceError(f"timestamp_s {text!r} must be finite and >= 0", path=path, line=line)
    if t < prev or (strict and t == prev):
        raise TraceError(f"timestamp_s {t!r} is {'not after' if strict else 'earlier than'} the "
                         f"previous row's {prev!r}; sort the trace by timestamp_s",
                         path=path, line=line)
    return t


def read_requests(path: str | os.PathLike[str]) -> RequestTrace:
    """Read a ``timestamp_s,model[,batch]`` CSV; models are numbered by first appearance."""
    p = os.fspath(path)
    ts: list[float] = []
    idx: list[int] = []
    batches: list[int] = []
    order: dict[str, int] = {}
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        cols, width = _header(reader, p, REQUEST_COLUMNS[:2], REQUEST_COLUMNS[2:])
        ct, cm, cb = cols["timestamp_s"], cols["model"], cols.get("batch")
        prev = 0.0
        for line, row in _rows(reader, p, width):
            prev = t = _timestamp(row[ct], p, line, prev, strict=False)
            name = row[cm].strip()
            if not name:
                raise TraceError("empty model name", path=p, line=line)
            k = order.get(name)
            if k is None:
                k = order[name] = len(order)
            ts.append(t)
            idx.append(k)
            if cb is not None:
                try:
                    b = int(row[cb])
                except ValueError:
                    raise TraceError(f"batch {row[cb]!r} is not an integer",
                                     path=p, line=line) from None
                if b < 1:
                    raise TraceError(f"batch {b} must be >= 1", path=p, line=line)
                batches.append(b)
    batch = np.asarray(batches, dtype=np.int32) if cb is not None else np.ones(len(ts), np.int32)
    return RequestTrace(np.asarray(ts, dtype=np.float64), np.asarray(idx, dtype=np.int32),
                        batch, tuple(order), source=p)



def _atomic_write(path: str | os.PathLike[str], header: Sequence[str],
                  rows: Iterable[Sequence[Any]]) -> None:
    p = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(p))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_requests(trace: RequestTrace, path: str | os.PathLike[str]) -> None:
    """Write ``trace`` as CSV (atomically); the batch column only if some batch is not 1."""
    names = np.asarray(trace.models, dtype=object)[trace.model].tolist()
    # repr of a Python float round-trips exactly; numpy scalars would print as np.float64(...)
    ts = [repr(t) for t in trace.timestamps.tolist()]
    if (trace.batch != 1).any():
        _atomic_write(path, REQUEST_COLUMNS, zip(ts, names, trace.batch.tolist()))
    else:
        _atomic_write(path, REQUEST_COLUMNS[:2], zip(ts, names))


def _budget_value(text: str, path: str, line: int) -> int:
    s = text.strip()
    try:
        v = int(s)
    except ValueError:
        from adaptive.units import parse_size  # sizes like "512MiB"; import only when needed

        try:
            v = int(parse_size(s))
        except (ValueError, AdaptiveError) as e:
            raise TraceError(f"budget_bytes {text!r} is neither an integer nor a size like "
                             f"'512MiB' ({e})", path=path, line=line) from None
    if v < 0:
        raise TraceError(f"budget_bytes {text!r} must be >= 0", path=path, line=line)
    return v


def read_budget(path: str | os.PathLike[str]) -> BudgetTrace:
    """Read a ``timestamp_s,budget_bytes`` CSV; budgets may be integers or sizes ("512MiB")."""
    p = os.fspath(path)
    ts: list[float] = []
    bb: list[int] = []
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        cols, width = _header(reader, p, BUDGET_COLUMNS)
        ct, cv = cols["timestamp_s"], cols["budget_bytes"]
        prev = -1.0
        for line, row in _rows(reader, p, width):
            prev = t = _timestamp(row[ct], p, line, prev, strict=True)
            ts.append(t)
            bb.append(_budget_value(row[cv], p, line))
    if not ts:
        raise TraceError("a budget trace needs at least one row after the header", path=p, line=2)
    return BudgetTrace(np.asarray(ts), np.asarray(bb, dtype=np.int64), source=p)


def write_budget(trace: BudgetTrace, path: str | os.PathLike[str]) -> None:
    """Write ``trace`` as CSV (atomically) with integer byte counts."""
    _atomic_write(path, BUDGET_COLUMNS,
                  zip((repr(t) for t in trace.timestamps.tolist()), trace.budget_bytes.tolist()))


def validate_models(trace: RequestTrace, known: Iterable[str]) -> None:
    """Raise :class:`TraceError` naming the first request (file line) whose model is unknown.

    Only models that some request uses are checked; an idle name in ``trace.models`` is harmless.
    """
    known_set = set(known)
    unknown = [k for k, n in enumerate(trace.models) if n not in known_set]
    if not unknown:
        return
    hits = np.isin(trace.model, np.asarray(unknown, dtype=np.int32))
    if not hits.any():
        return
    i = int(np.argmax(hits))
    name = trace.models[trace.model[i]]
    shown = sorted(known_set)
    more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
    msg = f"unknown model {name!r} (known: {', '.join(shown[:10])}{more})"
    if trace.source is not None:
        raise TraceError(msg, path=trace.source, line=i + 2)  # header is line 1
    raise TraceError(f"request #{i}: {msg}")


# ---------------------------------------------------------------------------------------------
# Synthetic generators

Generator = Callable[..., tuple[np.ndarray, np.ndarray]]
_KINDS: Registry[Generator] = Registry("trace kind", error=TraceError)


def register_trace_kind(name: str) -> Callable[[Generator], Generator]:
    """Register ``fn(n_models, requests, duration_s, rng, **kw) -> (timestamps, model_idx)``.

    Generators may return unsorted times in ``[0, duration_s)``; :func:`synth` sorts them.
    """

    return _KINDS.register(name)


def list_trace_kinds() -> list[str]:
    """Names accepted by :func:`synth`."""
    return _KINDS.names()


def synth(kind: str, models: int | Sequence[str], requests: int, seed: int,
          duration_s: float = 3600.0, **kw: Any) -> RequestTrace:
    """A synthetic trace of exactly ``requests`` requests over ``[0, duration_s)``.

    The same (kind, models, requests, seed, duration_s, kw) always gives the same trace.
    """
    fn = _KINDS.get(kind)
    if isinstance(models, int):
        if models < 1:
            raise TraceError(f"models must be >= 1, got {models}")
        width = len(str(models - 1))
        names = tuple(f"m{k:0{width}d}" for k in range(models))
    else:
        names = tuple(models)
        if not names:
            raise TraceError("models must name at least one model")
    if int(requests) != requests or requests < 0:
        raise TraceError(f"requests must be a non-negative integer, got {requests!r}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise TraceError(f"duration_s must be > 0, got {duration_s!r}")
    rng = np.random.default_rng(seed)
    ts, mi = fn(len(names), int(requests), float(duration_s), rng, **kw)
    ts = np.asarray(ts, dtype=np.float64)
    mi = np.asarray(mi, dtype=np.int32)
    if len(ts) != requests:
        raise AssertionError(f"generator {kind!r} returned {len(ts)} requests, not {requests}")
    order = np.argsort(ts, kind="stable")
    return RequestTrace(ts[order], mi[order], np.ones(len(ts), np.int32), names)


def zipf_weights(n: int, s: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Popularity ``1/rank**s`` normalised to 1; ranks shuffled over models when ``rng`` given.

    Shuffling keeps model 0 from always being the hottest, so model order carries no meaning.
    """
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    if rng is not None:
        w = w[rng.permutation(n)]
    return w / w.sum()


def _poisson_times(requests: int, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    # A Poisson process conditioned on its count is i.i.d. uniform; cumulative exponential gaps
    # scaled to the window give the same sorted times without a sort.
    gaps = rng.exponential(size=requests + 1)
    return (np.cumsum(gaps)[:-1] / gaps.sum()) * duration_s


@register_trace_kind("zipf")
def _zipf(n: int, requests: int, duration_s: float, rng: np.random.Generator,
          s: float = 1.1) -> tuple[np.ndarray, np.ndarray]:
    """Poisson arrivals at a constant total rate; each picks a model with Zipf(s) popularity."""
    ts = _poisson_times(requests, duration_s, rng)
    return ts, rng.choice(n, size=requests, p=zipf_weights(n, s, rng))


def _piecewise(starts: np.ndarray, lengths: np.ndarray, owner: np.ndarray, level: np.ndarray,
               requests: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample from a piecewise-constant intensity: segment k has ``level[k]`` on its span."""
    mass = level * lengths
    counts = rng.multinomial(requests, mass / mass.sum())
    seg = np.repeat(np.arange(len(starts)), counts)
    return starts[seg] + rng.random(requests) * lengths[seg], owner[seg]


@register_trace_kind("bursty")
def _bursty(n: int, requests: int, duration_s: float, rng: np.random.Generator,
            s: float = 1.1, mean_on_s: float = 60.0, mean_off_s: float = 600.0,
            off_ratio: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Each model alternates exponential ON/OFF periods (a 2-state MMPP).

    ON rate is proportional to a Zipf(s) weight, OFF rate is ``off_ratio`` of it; models switch
    independently, so the set of hot models keeps changing, which is what stresses recency.
    """
    w = zipf_weights(n, s, rng)
    cycles = int(math.ceil(duration_s / (mean_on_s + mean_off_s))) * 2 + 4
    while True:
        dur = np.empty((n, 2 * cycles))
        dur[:, 0::2] = rng.exponential(mean_on_s, size=(n, cycles))
        dur[:, 1::2] = rng.exponential(mean_off_s, size=(n, cycles))
        # start each model at a random point of its cycle (stationary start)
        dur[:, 0] *= rng.random(n)
        ends = np.cumsum(dur, axis=1)
        if (ends[:, -1] >= duration_s).all():
            break
        cycles *= 2
    starts = ends - dur
    on = np.zeros_like(dur, dtype=bool)
    on[:, 0::2] = True
    keep = starts < duration_s
    st = starts[keep]
    ln = np.minimum(ends[keep], duration_s) - st
    owner = np.broadcast_to(np.arange(n)[:, None], dur.shape)[keep]
    level = w[owner] * np.where(on[keep], 1.0, off_ratio)
    return _piecewise(st, ln, owner, level, requests, rng)


@register_trace_kind("diurnal")
def _diurnal(n: int, requests: int, duration_s: float, rng: np.random.Generator,
             s: float = 1.1, amplitude: float = 0.8, period_s: float | None = None,
             phase: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Total rate ``1 + amplitude*sin(2*pi*t/period_s + phase)`` (one period per trace by
    default), models drawn with Zipf(s) popularity: load, not mix, follows the day."""
    if not 0 <= amplitude <= 1:
        raise TraceError(f"amplitude must be in [0, 1], got {amplitude}")
    period = duration_s if period_s is None else float(period_s)
    out: list[np.ndarray] = []
    have = 0
    while have < requests:  # rejection sampling: exact, and ~2 rounds at most
        k = int((requests - have) * (1 + amplitude) * 1.1) + 16
        t = rng.random(k) * duration_s
        accept = rng.random(k) * (1 + amplitude) < 1 + amplitude * np.sin(
            2 * np.pi * t / period + phase)
        out.append(t[accept])
        have += int(accept.sum())
    ts = np.concatenate(out)[:requests] if out else np.zeros(0)
    return ts, rng.choice(n, size=requests, p=zipf_weights(n, s, rng))


@register_trace_kind("azure")
def _azure(n: int, requests: int, duration_s: float, rng: np.random.Generator,
           sigma_log10: float = 1.5, periodic_frac: float = 0.35, bursty_frac: float = 0.35,
           burst_size: float = 40.0, burst_s: float = 5.0,
           jitter: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Azure-Functions-like (Shahrad et al., ATC'20): per-model rates are log-normal over orders
    of magnitude (``sigma_log10`` decades), so a few models are hot and most are idle most of
    the time; each model follows one pattern: periodic (timer-triggered, a fixed interval with
    small jitter), bursty (tight clusters of requests) or Poisson.
    """
    if periodic_frac < 0 or bursty_frac < 0 or periodic_frac + bursty_frac > 1:
        raise TraceError("periodic_frac and bursty_frac must be >= 0 and sum to <= 1")
    share = 10.0 ** (sigma_log10 * rng.standard_normal(n))
    counts = rng.multinomial(requests, share / share.sum())
    kind = rng.choice(3, size=n, p=[periodic_frac, bursty_frac, 1 - periodic_frac - bursty_frac])
    owner = np.repeat(np.arange(n), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(requests) - np.repeat(first, counts)  # index of a request within its model
    c = np.maximum(counts, 1).astype(np.float64)
    ts = rng.random(requests) * duration_s  # Poisson by default
    # periodic: every duration/c seconds from a random phase, with small Gaussian jitter
    period = duration_s / c
    phase = rng.random(n) * period
    per_t = phase[owner] + k * period[owner] + jitter * period[owner] * rng.standard_normal(
        requests)
    # bursty: a Poisson number of bursts at uniform times, requests exponentially after them
    nb = np.clip(rng.poisson(c / burst_size), 1, np.maximum(counts, 1))
    bfirst = np.cumsum(nb) - nb
    centers = rng.random(int(nb.sum())) * duration_s
    which = bfirst[owner] + (rng.random(requests) * nb[owner]).astype(np.int64)
    bur_t = centers[which] + rng.exponential(burst_s, size=requests)
    ko = kind[owner]
    ts = np.where(ko == 0, per_t, np.where(ko == 1, bur_t, ts))
    return np.mod(ts, duration_s), owner
