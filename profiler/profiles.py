"""The query side of the catalog: frozen profiles that ``adaptive/`` consumes.

A :class:`VariantProfile` joins a stored variant's manifest (what it is) with
its measurements on one device and backend (what it costs and how good it
is). The cache charges each resident variant ``memory_at(max_batch)``:
measured where that batch was profiled, predicted by the fitted line
otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from profiler.catalog import Catalog
from profiler.device import device_info
from profiler.memory import MemoryFit
from variants.backends import parse_device
from variants.specs import Spec
from variants.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchProfile:
    """One variant at one batch size on one device and backend.

    ``peak_memory_bytes`` is the resident peak while serving this batch size
    (the session plus its working memory, above the process baseline): what a
    cache must reserve for the variant. ``load_peak_bytes`` is the transient
    peak while the session is built; ``process_peak_bytes`` the larger of the
    two, which is what an outside observer (``/usr/bin/time``) sees.
    """

    batch: int
    status: str  # "ok", "oom" or "error"
    error: str | None = None
    peak_memory_bytes: int | None = None
    static_memory_bytes: int | None = None
    load_peak_bytes: int | None = None
    baseline_bytes: int | None = None
    memory_method: str | None = None
    allocator: str | None = None  # "pinned" or "default": see profiler.memory
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_p99_s: float | None = None
    latency_mean_s: float | None = None
    latency_std_s: float | None = None
    throughput: float | None = None
    runs: int | None = None
    threads: int | None = None
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    measured_at: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def process_peak_bytes(self) -> int | None:
        vals = [v for v in (self.peak_memory_bytes, self.load_peak_bytes) if v is not None]
        return max(vals) if vals else None


@dataclass(frozen=True)
class VariantProfile:
    """Everything known about one variant on one device and backend."""

    name: str
    key: str
    model: str
    base: str
    specs: tuple[Spec, ...]
    params: int
    bytes: int
    device: str  # device type: "cpu" or "cuda"
    device_fingerprint: str
    backend: str
    batches: tuple[BatchProfile, ...] = ()
    accuracy: float | None = None
    fidelity: float | None = None
    fidelity_metric: str | None = None
    eval_set: str | None = None
    memory_fit: MemoryFit | None = None
    task: str = "classification"
    errors: tuple[str, ...] = field(default=(), compare=False)

    def batch(self, batch: int) -> BatchProfile | None:
        return next((b for b in self.batches if b.batch == batch), None)

    @property
    def ok_batches(self) -> tuple[BatchProfile, ...]:
        return tuple(b for b in self.batches if b.ok)

    @property
    def load_cold_s(self) -> float | None:
        """Cold load (file to first inference) at the smallest profiled batch."""
        return next((b.load_cold_s for b in self.ok_batches if b.load_cold_s is not None), None)

    @property
    def load_warm_s(self) -> float | None:
        """Warm load (bytes in memory to first inference) at the smallest profiled batch."""
        return next((b.load_warm_s for b in self.ok_batches if b.load_warm_s is not None), None)

    @property
    def quality(self) -> float | None:
        """Accuracy where labels exist, else fidelity to the base (what Pareto ranks by)."""
        return self.accuracy if self.accuracy is not None else self.fidelity

    def predict_memory(self, batch: int) -> int | None:
        """Memory predicted by the fitted line (None without a fit)."""
        return None if self.memory_fit is None else self.memory_fit.predict(batch)

    def memory_at(self, batch: int) -> int | None:
        """Peak memory at ``batch``: measured when profiled, else predicted."""
        b = self.batch(batch)
        if b is not None and b.ok and b.peak_memory_bytes is not None:
            return b.peak_memory_bytes
        return self.predict_memory(batch)

    def latency_at(self, batch: int) -> float | None:
        b = self.batch(batch)
        return b.latency_p50_s if b is not None and b.ok else None


def _resolve_fingerprint(cat: Catalog, device: str, backend: str,
                         fingerprint: str | None) -> str | None:
    """This machine's fingerprint for ``device``; else the newest one with profiles."""
    if fingerprint:
        return fingerprint
    kind, _ = parse_device(device)
    mine = device_info(device).fingerprint
    if cat.batch_rows(mine, backend):
        return mine
    for row in cat.devices(kind):
        if cat.batch_rows(row["fingerprint"], backend):
            log.info("no %s profiles from this machine; using those of device %s (%s)",
                     device, row["fingerprint"], row["gpu"] or row["cpu"])
            return row["fingerprint"]
    return mine


def load_profiles(store: Store | str | Path, device: str = "cpu",
                  backend: str = "onnxruntime", *, fingerprint: str | None = None,
                  eval_set: str | None = None, include_unprofiled: bool = False
                  ) -> list[VariantProfile]:
    """Profiles of the store's variants on ``device`` and ``backend``.

    Per-batch results come from this machine's device fingerprint (or, when
    none exist, from the newest machine of that device type that profiled the
    store; ``fingerprint=`` pins one). Accuracy comes from ``eval_set`` or,
    by default, the newest evaluation with labels (else the newest at all).
    Variants with no measurement are left out unless ``include_unprofiled``.
    """
    store = store if isinstance(store, Store) else Store(store)
    if not store.catalog_path.exists():
        return []
    kind, _ = parse_device(device)
    with Catalog(store.catalog_path) as cat:
        fp = _resolve_fingerprint(cat, device, backend, fingerprint)
        manifests = store.manifests()
        keys = {m.key for m in manifests}
        rows: dict[str, list] = {}
        for r in cat.batch_rows(fp, backend, keys) if fp else []:
            rows.setdefault(r["variant_key"], []).append(r)
        acc: dict[str, list] = {}
        for r in cat.accuracy_rows(kind, backend):
            if r["variant_key"] in keys:
                acc.setdefault(r["variant_key"], []).append(r)
        fits = cat.fits(fp, backend) if fp else {}
    out = []
    for m in manifests:
        if m.key not in rows and m.key not in acc and not include_unprofiled:
            continue
        batches = tuple(_batch_profile(r) for r in sorted(rows.get(m.key, []),
                                                          key=lambda r: r["batch"]))
        a = _pick_accuracy(acc.get(m.key, []), eval_set)
        errors = tuple(f"batch {b.batch}: {b.error}" for b in batches if b.error)
        if a is not None and a["error"]:
            errors += (f"accuracy ({a['eval_set']}): {a['error']}",)
        out.append(VariantProfile(
            name=m.name, key=m.key, model=m.model, base=m.base, specs=m.specs,
            params=m.params, bytes=m.bytes, device=kind, device_fingerprint=fp or "",
            backend=backend, batches=batches,
            accuracy=a["accuracy"] if a is not None else None,
            fidelity=a["fidelity"] if a is not None else None,
            fidelity_metric=a["fidelity_metric"] if a is not None else None,
            eval_set=a["eval_set"] if a is not None else None,
            memory_fit=fits.get(m.key), task=m.task, errors=errors))
    return out


def _batch_profile(r) -> BatchProfile:
    names = BatchProfile.__dataclass_fields__
    # sqlite3.Row iterates over values, not keys
    return BatchProfile(**{k: r[k] for k in r.keys() if k in names})  # noqa: SIM118


def _pick_accuracy(rows: list, eval_set: str | None):
    if eval_set is not None:
        rows = [r for r in rows if r["eval_set"] == eval_set]
    ok = [r for r in rows if r["status"] == "ok"]
    labelled = [r for r in ok if r["accuracy"] is not None]
    for group in (labelled, ok, rows):
        if group:
            return max(group, key=lambda r: r["measured_at"])
    return None


def _front(points: Sequence[tuple[str, float, float]]) -> set[str]:
    """Names of the points not dominated in (cost lower, quality higher)."""
    out = set()
    for name, cost, q in points:
        dominated = any((c2 <= cost and q2 >= q) and (c2 < cost or q2 > q)
                        for n2, c2, q2 in points if n2 != name)
        if not dominated:
            out.add(name)
    return out


def pareto(profiles: Iterable[VariantProfile], batch: int,
           by: Sequence[str] = ("memory", "latency")) -> set[str]:
    """Names of the variants on a Pareto front at ``batch``, per base model.

    A variant is on the front of a plane (``memory``: memory at ``batch`` vs
    quality; ``latency``: p50 latency at ``batch`` vs quality) when no variant
    of the same base is at least as cheap and at least as good, and better in
    one. The result is the union over the planes in ``by``. Quality is
    accuracy where labels exist, else fidelity; variants without a quality or
    a cost at ``batch`` are left out.
    """
    unknown = set(by) - {"memory", "latency"}
    if unknown:
        raise ValueError(f"unknown Pareto axes {sorted(unknown)}; use 'memory' and/or 'latency'")
    groups: dict[str, list[VariantProfile]] = {}
    for p in profiles:
        groups.setdefault(p.base, []).append(p)
    out: set[str] = set()
    for members in groups.values():
        # one quality measure per group: accuracy when any member has it, else fidelity
        use_acc = any(p.accuracy is not None for p in members)
        for axis in by:
            pts = []
            for p in members:
                cost = p.memory_at(batch) if axis == "memory" else p.latency_at(batch)
                q = p.accuracy if use_acc else p.fidelity
                if cost is not None and q is not None:
                    pts.append((p.name, float(cost), float(q)))
            out |= _front(pts)
    return out
