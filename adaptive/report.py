"""Pictures of simulation results (matplotlib, Agg; imported only when plotting)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the columns of :func:`simulation_table`: header, SimResult field, format, scale
TABLE_COLUMNS = (
    ("miss", "miss_rate", "{:.4f}", 1),
    ("stall", "stall_rate", "{:.4f}", 1),
    ("SLO att.", "slo_attainment", "{:.4f}", 1),
    ("eff. acc.", "effective_accuracy", "{:.4f}", 1),
    ("norm. acc.", "normalized_accuracy", "{:.4f}", 1),
    ("mean lat", "mean_latency_s", "{:.1f} ms", 1e3),
    ("p99 lat", "p99_latency_s", "{:.1f} ms", 1e3),
    ("goodput", "goodput", "{:.1f}/s", 1),
    ("loaded", "bytes_loaded", "{:.2f} GB", 1e-9),
    ("floor viol.", "floor_violations", "{:.0f}", 1),
    ("rejected", "rejected", "{:.0f}", 1),
)


def accuracy_lost(row: Mapping[str, Any] | Any) -> str:
    """``"late / rungs"``: what late requests and smaller variants took of a result's
    effective accuracy (a :class:`~adaptive.simulate.SimResult` or its ``to_dict()``; "-"
    where the row has no split, as results written before it)."""
    get = row.get if isinstance(row, Mapping) else lambda k: getattr(row, k, None)
    late, rungs = get("accuracy_lost_late"), get("accuracy_lost_rungs")
    if late is None or rungs is None:
        return "-"
    return f"{late:.4f} / {rungs:.4f}"


def best_static_summary(z: Mapping[str, Any]) -> str:
    """Sentences on the part of the ratio to the bound that no online policy can close, on the
    cells above the compulsory misses of traces whose requests are independent draws from a
    fixed popularity (``benchmarks/policies.py``'s ``summary.static_irm_summary``;
    :func:`adaptive.bounds.irm_online_misses` and :func:`adaptive.bounds.best_static_misses`)."""
    kinds = " and ".join(z["kinds"])
    static = (f"the best *fixed* set of resident models, chosen knowing every model's request "
              f"count, misses {z['static_over_bound_min']:.2f}-{z['static_over_bound_max']:.2f}x "
              f"the bound (median {z['static_over_bound_median']:.2f}), and memadapt misses "
              f"median {z['memadapt_over_static_median']:.2f}x, at most "
              f"{z['memadapt_over_static_max']:.2f}x, what that set misses "
              f"(`adaptive.bounds.best_static_misses`).")
    if "irm_over_bound_median" not in z:  # a result from before the bound on online policies
        return (f"On the {kinds} traces, whose requests are independent draws from a fixed "
                f"popularity, in their {z['cells']} cells above the compulsory misses " + static)
    return (f"On the {kinds} traces, whose requests are independent draws from a fixed "
            f"popularity, part of the ratio to the bound is out of every online policy's reach: "
            f"there no online policy, variant-aware or not, can expect fewer misses than "
            f"requests x (1 - the largest share of requests that models fitting the budget "
            f"together take) (`adaptive.bounds.irm_online_misses`, with the trace's own "
            f"request shares). In their {z['cells']} cells above the compulsory misses that "
            f"is {z['irm_over_bound_min']:.2f}-{z['irm_over_bound_max']:.2f}x the bound "
            f"(median {z['irm_over_bound_median']:.2f}), more than 1.3x in "
            f"{z['irm_over_1_3']} of them, and memadapt misses median "
            f"{z['memadapt_over_irm_median']:.2f}x, at most {z['memadapt_over_irm_max']:.2f}x, "
            f"that. Likewise " + static)


def simulation_table(results: Mapping[str, Any], *, title: str = "") -> Any:
    """A rich Table of :func:`adaptive.simulate.compare`'s results, one row per policy (the
    ``bound`` row shows its miss rate only)."""
    import math

    from rich.table import Table

    t = Table(title=title)
    t.add_column("policy", justify="left", no_wrap=True)
    for head, *_ in TABLE_COLUMNS:
        t.add_column(head, justify="right")
    for name, r in results.items():
        cells = []
        for _, key, fmt, scale in TABLE_COLUMNS:
            v = getattr(r, key)
            bad = v is None or (isinstance(v, float) and math.isnan(v))
            cells.append("-" if bad or (name == "bound" and key != "miss_rate")
                         else fmt.format(v * scale))
        t.add_row(f"[bold]{name}[/bold]" if name == "memadapt" else name, *cells)
    return t


def plot_simulation(results: Mapping[str, Any], path: str | Path, *, title: str = "") -> None:
    """Miss + stall rate and effective accuracy per policy (the bound as a line), and
    resident memory over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = results.get("bound")
    names = [n for n in results if n != "bound"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = ["black" if n == "memadapt" else "tab:gray" for n in names]
    axes[0].bar(names, [results[n].miss_rate + results[n].stall_rate for n in names],
                color=colors)
    if bound is not None:
        axes[0].axhline(bound.miss_rate, color="red", linestyle=":", label="bound (any policy)")
        axes[0].legend(fontsize=7)
    axes[0].set_ylabel("miss + stall rate")
    axes[1].bar(names, [results[n].effective_accuracy for n in names], color=colors)
    accs = [results[n].effective_accuracy for n in names if results[n].effective_accuracy > 0]
    if accs:
        axes[1].set_ylim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.02))
    axes[1].set_ylabel("effective accuracy (late = 0)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3, axis="y")
    for n in names:
        series = results[n].memory_series
        if series:
            t = [p[0] for p in series]
            axes[2].plot(t, [p[1] / 2**20 for p in series], label=n,
                         linewidth=2.5 if n == "memadapt" else 1)
    first = next((results[n].memory_series for n in names if results[n].memory_series), None)
    if first:
        axes[2].step([p[0] for p in first], [p[2] / 2**20 for p in first], "r--",
                     where="post", label="budget")
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("resident MiB")
    axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
