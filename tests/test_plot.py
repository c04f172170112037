"""`hpd plot`'s figure: lines that coincide stay visible, and one evaluation is a point on the
whole run's axis."""

from __future__ import annotations

import json

import pytest


def test_plot_keeps_lines_apart_and_the_axis_whole(tmp_path):
    pytest.importorskip("matplotlib")
    from hpd.report.plot import plot_runs

    runs = []
    for name, method in (("jsd-seed0", "jsd"), ("hpd-seed0", "hpd")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"method: {method}\n")
        records = [{"step": s, "loss": -0.5, "kl": 1.0 / s} for s in range(1, 5)] + [{"step": 4, "eval/kl": 0.3}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run)
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.close
    monkey = lambda fig: captured.setdefault("fig", fig) and real(fig)  # noqa: E731
    plt.close = monkey
    try:
        plot_runs(runs, tmp_path / "c.png")
    finally:
        plt.close = real
    axes = captured["fig"].axes
    titles = [ax.get_title() for ax in axes]
    assert "training loss" not in titles  # two methods: their loss values are not comparable
    for ax in axes:
        styles = [line.get_linestyle() for line in ax.get_lines()]
        assert len(set(styles)) == len(styles)  # coinciding curves stay visible
        assert ax.get_xlim() == (0.0, 4.0)  # one evaluation is a point on the whole run's axis
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["jsd", "hpd"]
