"""Training curves from one or several runs' metrics.jsonl (matplotlib, an optional extra)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# "kl" (on the training batch) is comparable across methods; each method's loss value is
# its own quantity (hpd's a surrogate that can go negative), so "loss" is drawn only when
# every run used the same method
PANELS = (("loss", "training loss"), ("kl", "KL(teacher || student), training batch"),
          ("eval/kl", "KL(teacher || student), held out"), ("eval/accuracy", "held-out exact match"))
STYLES = ("-", "--", "-.", ":")  # lines that coincide stay visible


def _read(run_dir):
    """(label, records, method) of a run folder; the label is the method, with the folder's
    name when that name says something else."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it an hpd run folder?)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno}: not valid JSON") from None
    label, method = run_dir.name, None
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        method = (yaml.safe_load(cfg_path.read_text()) or {}).get("method", "?")
        label = method if run_dir.name.startswith(method) else f"{method} ({run_dir.name})"
    return label, records, method


def plot_runs(run_dirs, out: str | Path, *, labels: list[str] | None = None,
              panels: tuple | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("hpd plot needs matplotlib: pip install 'hpd-distill[plot]'") from None
    read = [_read(d) for d in run_dirs]
    runs = [(labels[i] if labels else label, recs) for i, (label, recs, _) in enumerate(read)]
    one_method = len({method for _, _, method in read}) == 1
    wanted = panels or [p for p in PANELS if p[0] != "loss" or one_method]
    panels = [(key, title) for key, title in wanted if any(key in r for _, recs in runs for r in recs)]
    if not panels:
        raise ValueError("none of the runs logged " + ", ".join(k for k, _ in wanted))
    last_step = max((r.get("step", 0) for _, recs in runs for r in recs), default=1)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (label, recs) in enumerate(runs):
            # a skipped step (skipped: true, its values null, or the strings "nan" of older
            # runs) was not taken: no point
            points = [(r["step"], r[key]) for r in recs
                      if not r.get("skipped") and isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, linestyle=STYLES[i % len(STYLES)],
                        marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_xlim(0, max(last_step, 1))  # a single evaluation is a point on the run's axis, not a zoom
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
