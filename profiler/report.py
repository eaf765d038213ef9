"""Turning profiles into rows, a rich table and a plot, for ``memadapt profile/show``.

``rows`` is the one flattening (JSON output, the table and the plot all read
it), so the three never disagree. rich and matplotlib are imported only by
the function that draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from profiler.profiles import VariantProfile, pareto

MiB = 1024 * 1024


def rows(profiles: Iterable[VariantProfile]) -> list[dict[str, Any]]:
    """One dict per (variant, profiled batch size); a variant without batch results gets
    one row with ``batch: None``. ``pareto`` says whether the variant is on a Pareto front
    (memory or latency vs accuracy/fidelity) at that batch size."""
    profiles = list(profiles)
    fronts: dict[int, set[str]] = {}
    out = []
    for p in profiles:
        common = {"name": p.name, "key": p.key, "model": p.model, "base": p.base,
                  "specs": [s.tag for s in p.specs], "params": p.params, "bytes": p.bytes,
                  "device": p.device, "device_fingerprint": p.device_fingerprint,
                  "backend": p.backend, "load_cold_s": p.load_cold_s,
                  "load_warm_s": p.load_warm_s, "accuracy": p.accuracy, "fidelity": p.fidelity,
                  "fidelity_metric": p.fidelity_metric, "eval_set": p.eval_set,
                  "memory_fit_static_bytes": p.memory_fit.static_bytes if p.memory_fit else None,
                  "memory_fit_per_sample_bytes":
                      p.memory_fit.per_sample_bytes if p.memory_fit else None,
                  "memory_fit_residual_bytes":
                      p.memory_fit.residual_bytes if p.memory_fit else None}
        if not p.batches:
            out.append({**common, "batch": None, "status": None, "error": None,
                        "peak_memory_bytes": None, "static_memory_bytes": None,
                        "load_peak_bytes": None, "latency_p50_s": None, "latency_p95_s": None,
                        "latency_p99_s": None, "throughput": None, "threads": None,
                        "pareto": False})
            continue
        for b in p.batches:
            if b.batch not in fronts:
                fronts[b.batch] = pareto(profiles, b.batch)
            out.append({**common, "batch": b.batch, "status": b.status, "error": b.error,
                        "peak_memory_bytes": b.peak_memory_bytes,
                        "static_memory_bytes": b.static_memory_bytes,
                        "load_peak_bytes": b.load_peak_bytes,
                        "latency_p50_s": b.latency_p50_s, "latency_p95_s": b.latency_p95_s,
                        "latency_p99_s": b.latency_p99_s, "throughput": b.throughput,
                        "threads": b.threads, "load_cold_s": b.load_cold_s,
                        "load_warm_s": b.load_warm_s,
                        "pareto": b.ok and p.name in fronts[b.batch]})
    return out


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MiB:,.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:,.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def table(profiles: Iterable[VariantProfile], title: str | None = None):
    """A ``rich.table.Table`` of :func:`rows`: MiB and ms, Pareto rows marked ★."""
    from rich.table import Table

    data = rows(profiles)
    t = Table(title=title, caption="★ on a Pareto front (memory or latency vs quality) "
                                   "at that batch size")
    for col, justify in [("variant", "left"), ("batch", "right"), ("peak MiB", "right"),
                         ("static MiB", "right"), ("p50 ms", "right"), ("p95 ms", "right"),
                         ("samples/s", "right"), ("cold load ms", "right"),
                         ("accuracy", "right"), ("fidelity", "right"), ("status", "left")]:
        t.add_column(col, justify=justify)
    for r in data:
        status = r["status"] or "-"
        if r["error"]:
            status = f"[red]{status}[/red]: {r['error'][:60]}"
        t.add_row(("★ " if r["pareto"] else "  ") + r["name"],
                  "-" if r["batch"] is None else str(r["batch"]),
                  _mib(r["peak_memory_bytes"]), _mib(r["static_memory_bytes"]),
                  _ms(r["latency_p50_s"]), _ms(r["latency_p95_s"]),
                  "-" if r["throughput"] is None else f"{r['throughput']:,.1f}",
                  _ms(r["load_cold_s"]), _pct(r["accuracy"]),
                  "-" if r["fidelity"] is None else f"{r['fidelity']:.4f}", status)
    return t


def plot(profiles: Iterable[VariantProfile], path: str | Path,
         batch: int | None = None) -> Path:
    """Save a PNG: memory vs quality and latency vs quality at ``batch`` (default: the
    smallest batch profiled), one colour per base model, Pareto fronts drawn as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(profiles)
    if batch is None:
        sizes = sorted({b.batch for p in profiles for b in p.ok_batches})
        batch = sizes[0] if sizes else 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    groups: dict[str, list[VariantProfile]] = {}
    for p in profiles:
        groups.setdefault(p.base, []).append(p)
    for axis, ax in zip(("memory", "latency"), axes):
        for gi, (base, members) in enumerate(sorted(groups.items())):
            use_acc = any(p.accuracy is not None for p in members)
            front = pareto(members, batch, by=(axis,))
            pts = _points(members, batch, axis, use_acc)
            if not pts:
                continue
            color = f"C{gi % 10}"
            ax.scatter([x for _, x, _ in pts], [y for _, _, y in pts], color=color,
                       label=f"{base} ({'accuracy' if use_acc else 'fidelity'})")
            for name, x, y in pts:
                ax.annotate(("★" if name in front else "") + name, (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            fp = sorted((x, y) for name, x, y in pts if name in front)
            if len(fp) > 1:
                ax.step([x for x, _ in fp], [y for _, y in fp], where="post", color=color,
                        alpha=0.6)
        ax.set_xlabel(f"peak memory at batch {batch} (MiB)" if axis == "memory"
                      else f"p50 latency at batch {batch} (ms)")
        ax.set_ylabel("accuracy / fidelity")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("memadapt variants" + (f" on {profiles[0].device}" if profiles else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _points(members: Sequence[VariantProfile], batch: int, axis: str, use_acc: bool):
    pts = []
    for p in members:
        if axis == "memory":
            m = p.memory_at(batch)
            cost = None if m is None else m / MiB
        else:
            lat = p.latency_at(batch)
            cost = None if lat is None else lat * 1e3
        q = p.accuracy if use_acc else p.fidelity
        if cost is not None and q is not None:
            pts.append((p.name, cost, q))
    return pts


def group_rows(groups: Iterable[Any], batch: int | None = None) -> list[dict[str, Any]]:
    """One dict per (group, profiled member) of :func:`profiler.load_group_profiles`' result:
    the data they were evaluated on, the member's accuracy, its fidelity to the group's
    reference (its most accurate member) and its peak memory at ``batch`` (default: the
    smallest batch it was profiled at)."""
    out = []
    for g in groups:
        for p in g.members:
            b = batch or min((x.batch for x in p.ok_batches), default=None)
            out.append({"group": g.name, "member": p.name, "base": p.base,
                        "eval_set": g.eval_set, "reference": g.reference,
                        "is_reference": p.name == g.reference, "accuracy": p.accuracy,
                        "fidelity_to_reference": g.fidelity.get(p.name),
                        "fidelity_metric": g.fidelity_metric, "quality": g.quality(p.name),
                        "batch": b, "peak_memory_bytes": p.memory_at(b) if b else None})
    return out


def group_table(groups: Iterable[Any], batch: int | None = None, title: str | None = None):
    """A ``rich.table.Table`` of :func:`group_rows` (the reference member marked ◆)."""
    from rich.table import Table

    t = Table(title=title, caption="◆ the group's reference: its most accurate member")
    for col, justify in [("group", "left"), ("member", "left"), ("eval", "left"),
                         ("batch", "right"), ("peak MiB", "right"), ("accuracy", "right"),
                         ("fidelity to ◆", "right")]:
        t.add_column(col, justify=justify)
    for r in group_rows(groups, batch):
        t.add_row(r["group"], ("◆ " if r["is_reference"] else "  ") + r["member"],
                  r["eval_set"] or "-", "-" if r["batch"] is None else str(r["batch"]),
                  _mib(r["peak_memory_bytes"]), _pct(r["accuracy"]),
                  "-" if r["fidelity_to_reference"] is None
                  else f"{r['fidelity_to_reference']:.4f}")
    return t
