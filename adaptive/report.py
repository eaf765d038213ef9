"""Pictures of simulation results (matplotlib, Agg; imported only when plotting)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_simulation(results: Mapping[str, Any], path: str | Path, *, title: str = "") -> None:
    """Miss rate and served accuracy per policy, and resident memory over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = ["black" if n == "memadapt" else "tab:gray" for n in names]
    axes[0].bar(names, [results[n].miss_rate for n in names], color=colors)
    axes[0].set_ylabel("miss (cold-load) rate")
    axes[1].bar(names, [results[n].mean_accuracy for n in names], color=colors)
    accs = [results[n].mean_accuracy for n in names if results[n].mean_accuracy > 0]
    if accs:
        axes[1].set_ylim(max(0.0, min(accs) - 0.05), min(1.0, max(accs) + 0.02))
    axes[1].set_ylabel("mean served accuracy")
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
