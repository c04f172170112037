"""Training curves from one or several runs' metrics.jsonl (matplotlib, an optional extra)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

PANELS = (("loss", "training loss"), ("eval/kl", "KL(teacher || student), held out"),
          ("eval/accuracy", "held-out exact match"))


def read_run(run_dir: str | Path) -> tuple[str, list[dict]]:
    """(label, records) of a run folder; the label names the method (and the seed)."""
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
    label = run_dir.name
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        label = f"{cfg.get('method', '?')} ({run_dir.name})"
    return label, records


def plot_runs(run_dirs, out: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("hpd plot needs matplotlib: pip install 'hpd-distill[plot]'") from None
    runs = [read_run(d) for d in run_dirs]
    panels = [(key, title) for key, title in PANELS if any(key in r for _, recs in runs for r in recs)]
    if not panels:
        raise ValueError("none of the runs logged loss, eval/kl or eval/accuracy")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for label, recs in runs:
            points = [(r["step"], r[key]) for r in recs if key in r and isinstance(r[key], (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
