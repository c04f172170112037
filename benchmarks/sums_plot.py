"""The figure of a sums benchmark (benchmarks.sums_report): held-out greedy exact match against
steps and against training seconds, and the gradient norm, one line per method."""

from __future__ import annotations

import statistics
from pathlib import Path


def plot(results: dict, methods: list, path: Path) -> Path:
    """The runs of `results` in three panels; a method's colour and line style come from its place
    in `methods`, so that it keeps them in every figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, m in enumerate(methods):
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        kw = dict(color=colors[i % 10], linestyle=styles[i % len(styles)], marker=markers[i % len(markers)],
                  markersize=5, linewidth=1.8, label=m)
        n = min(len(r["series"]["evals"]) for r in rs)
        steps = [rs[0]["series"]["evals"][j]["step"] for j in range(n)]
        acc = [[r["series"]["evals"][j]["accuracy"] for r in rs] for j in range(n)]
        secs = [statistics.fmean(r["series"]["evals"][j]["seconds"] for r in rs) for j in range(n)]
        mean = [statistics.fmean(a) for a in acc]
        lo, hi = [min(a) for a in acc], [max(a) for a in acc]
        # points at the same step would hide each other: each method is nudged sideways a little
        dodge = (i - (len(methods) - 1) / 2) * 0.006 * max(steps[-1], 1)
        for ax, xs in ((axes[0], [x + dodge for x in steps]), (axes[1], secs)):
            ax.plot(xs, mean, **kw)
            if len(rs) > 1:
                ax.fill_between(xs, lo, hi, color=colors[i % 10], alpha=0.12, linewidth=0)
        # gradient norm: mean over seeds, smoothed over 10 steps
        length = min(len(r["series"]["grad_norm"]) for r in rs)
        g = [statistics.fmean(r["series"]["grad_norm"][t] for r in rs) for t in range(length)]
        smooth = [statistics.fmean(g[max(0, t - 9):t + 1]) for t in range(length)]
        axes[2].plot(rs[0]["series"]["steps"][:length], smooth, color=colors[i % 10],
                     linestyle=styles[i % len(styles)], linewidth=1.6, label=m)
    axes[0].set(title="held-out greedy exact match vs steps\n(mean over seeds, band min-max; methods nudged apart on x)",
                xlabel="optimizer step", ylabel="exact match")
    axes[1].set(title="held-out greedy exact match vs training seconds\n(same points; x: mean over seeds)",
                xlabel="training seconds (forward, backward, rollouts)", ylabel="exact match")
    axes[2].set(title="gradient norm before clipping\n(mean over seeds, 10-step moving average)",
                xlabel="optimizer step", ylabel="gradient norm", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
