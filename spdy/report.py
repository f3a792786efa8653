"""A picture of a result: per-layer sparsity, and where the time goes before and after."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from spdy.types import LatencyTable, Solution


def plot_profile(table: LatencyTable, solution: Solution, path: str | os.PathLike[str],
                 baselines: Mapping[str, Solution] | None = None, title: str = "") -> None:
    """Write a PNG with two panels: sparsity per layer (with baselines) and time per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(table.layers)
    x = np.arange(L)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.28 * L + 3), 7), sharex=True)
    ax1.bar(x, solution.sparsities, color="tab:blue", label="SPDY")
    for (name, sol), marker in zip((baselines or {}).items(), ("_", "x", "+")):
        ax1.plot(x, sol.sparsities, marker, color="black" if marker == "_" else "tab:red", ms=9, ls="none", label=name)
    ax1.set_ylabel("sparsity")
    ax1.set_ylim(0, 1)
    ax1.legend(loc="upper left", fontsize=8, ncol=3)
    ax1.set_title(title or f"SPDY profile: predicted {solution.predicted_speedup:.2f}x", fontsize=9)
    dense_ms = table.times[:, 0] * 1e3
    chosen_ms = table.times[x, solution.levels] * 1e3
    ax2.bar(x - 0.2, dense_ms, width=0.4, color="lightgray", label=f"dense plan (total {table.dense_total_s * 1e3:.1f} ms)")
    ax2.bar(x + 0.2, chosen_ms, width=0.4, color="tab:orange",
            label=f"pruned (total {solution.predicted_time_s * 1e3:.1f} ms)")
    ax2.set_ylabel("layer time (ms)")
    ax2.legend(loc="upper left", fontsize=8, title=f"base (not prunable): {table.base_s * 1e3:.2f} ms", title_fontsize=8)
    short = [n.replace("encoder.layer.", "L").replace("attention.", "att.") for n in table.layers]
    ax2.set_xticks(x, short, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
