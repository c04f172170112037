"""Logging people already watch: --report-to tensorboard|wandb (offline), plain console lines
without a terminal (--log-every), and evaluations that reach the console."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hpd.cli.main import cli

import hpd

pytestmark = pytest.mark.slow


def config(assets, out: Path, **kw) -> dict:
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               eval_data=str(assets["held"]), eval_every=2, out=str(out), steps=4, batch_size=4, lr=3e-3,
               progress=False, chunked="off", seed=0)
    cfg.update(kw)
    return cfg


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_receives_every_record(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    hpd.distill(config(assets, out, report_to=["tensorboard"]))
    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    logged = records(out)
    for record in logged:  # every numeric value of every metrics.jsonl record, at its step
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            assert key in tags, key
            points = {e.step: e.value for e in acc.Scalars(key)}
            assert points[record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, record["step"])
    assert {"loss", "kl", "eval/kl", "eval/loss"} <= tags


def _wandb_history(run_dir: Path, key: str) -> list[float]:
    """Distinct values logged under `key`, in order, read from the offline run's record file
    (history and summary items carry the key and its JSON value as plain strings)."""
    path = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    for _ in range(300):  # wandb's service may still be writing the file after finish() returned
        if path.stat().st_size > 100 and len(path.read_bytes()) == path.stat().st_size:
            time.sleep(0.5)  # and let it complete the write
            break
        time.sleep(0.1)
    data = path.read_bytes()
    name = key.encode()
    pattern = re.escape(b"\x12" + bytes([len(name)]) + name + b"\x82\x01")
    values = []
    for m in re.finditer(pattern, data):
        n = data[m.end()]
        values.append(float(data[m.end() + 1:m.end() + 1 + n]))
    return list(dict.fromkeys(values))


def test_wandb_offline_receives_every_record(assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    hpd.distill(config(assets, out, report_to=["wandb"]))
    logged = records(out)
    losses = [r["loss"] for r in logged if "loss" in r]
    assert _wandb_history(out, "loss") == pytest.approx(losses)
    evals = [r["eval/kl"] for r in logged if "eval/kl" in r]
    assert len(evals) == 2 and _wandb_history(out, "eval/kl") == pytest.approx(evals)
    # the run folder with the wandb folder in it is still recognised as an earlier run
    hpd.distill(config(assets, out, steps=1, overwrite=True))


@pytest.mark.parametrize("target", ["tensorboard", "wandb"])
def test_reporters_do_not_import_torch(target, tmp_path):
    pytest.importorskip(target)
    code = (
        "import sys, pathlib\n"
        "from hpd.report.reporters import open_reporters\n"
        f"[r] = open_reporters([{target!r}], pathlib.Path({str(tmp_path)!r}), {{}})\n"
        "r({'step': 1, 'loss': 1.5, 'eval/kl': 0.25}); r.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_report_target_lists_the_choices(assets, tmp_path):
    with pytest.raises(ValueError, match="report_to='tensorbord': allowed none, tensorboard, wandb"):
        hpd.distill(config(assets, tmp_path / "run", report_to=["tensorbord"]))
    assert not (tmp_path / "run").exists()


def _cli(assets, tmp_path, *extra):
    args = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]), "--data",
            str(assets["data"]), "--eval-data", str(assets["held"]), "--eval-every", "2", "--out",
            str(tmp_path / "run"), "--steps", "4", "--batch-size", "4", "--chunked", "off", *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_log_every_prints_plain_lines(assets, tmp_path):
    text = _cli(assets, tmp_path, "--log-every", "2")
    lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert re.fullmatch(r"step 2/4  loss -?\d+\.\d{4}  kl \d+\.\d{4}  lr \S+  tok/s \d+  eta \S+", lines[0]), lines
    assert re.fullmatch(r"step 2/4  eval: loss \S+  kl \S+", lines[1]), lines
    assert [ln.split()[1] for ln in lines] == ["2/4", "2/4", "4/4", "4/4"]
    assert "\r" not in text and "it/s" not in text and "step/s" not in text


def test_without_a_terminal_plain_lines_are_the_default(assets, tmp_path):
    text = _cli(assets, tmp_path)  # CliRunner's streams are no terminal
    steps = [ln for ln in text.splitlines() if re.match(r"step \d/4  loss", ln)]
    assert len(steps) == 4 and "\r" not in text


def test_no_progress_still_prints_evaluations(assets, tmp_path):
    text = _cli(assets, tmp_path, "--no-progress")
    assert not re.search(r"step \d/4  loss", text)
    assert [ln.split("  ")[0] for ln in text.splitlines() if "eval:" in ln] == ["step 2/4", "step 4/4"]


def test_log_every_over_a_real_pipe(assets, tmp_path):
    """The `hpd` process itself with stdout and stderr piped (no terminal anywhere)."""
    args = [sys.executable, "-m", "hpd.cli.main", "distill", "--teacher", str(assets["teacher"]),
            "--student", str(assets["student"]), "--data", str(assets["data"]), "--out", str(tmp_path / "run"),
            "--steps", "3", "--batch-size", "4", "--chunked", "off"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(re.findall(r"^step \d/3  loss", done.stderr, re.M)) == 3
    assert "\r" not in done.stderr


@pytest.mark.parametrize("form", ["old", "new"])
def test_skipped_steps_are_read_in_both_forms(tmp_path, form):
    """metrics.jsonl wrote a skipped step's values as the strings "nan" (skipped: 1); it now
    writes numbers or null (skipped: true). The plot and the reporters read both, and draw or
    send nothing of a step that was not taken."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hpd.report.plot import plot_runs
    from hpd.report.reporters import numbers

    skipped = ({"step": 3, "skipped": 1, "loss": "nan", "grad_norm": "inf", "skipped_steps": 1} if form == "old"
               else {"step": 3, "skipped": True, "loss": 2.5, "grad_norm": None, "skipped_steps": 1})
    rows = [{"step": 1, "loss": 1.0, "kl": 0.5}, {"step": 2, "loss": 0.8, "kl": 0.4}, skipped,
            {"step": 3, "loss": 0.7, "kl": 0.3}]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert numbers(skipped) == {"skipped_steps": 1.0}
    assert numbers(rows[1]) == {"loss": 0.8, "kl": 0.4}
    captured, real = {}, plt.close
    plt.close = lambda fig: captured.setdefault("fig", fig) and real(fig)
    try:
        plot_runs([run], tmp_path / "c.png")
    finally:
        plt.close = real
    by_title = {ax.get_title(): ax for ax in captured["fig"].axes}
    xs, ys = by_title["training loss"].get_lines()[0].get_data()
    assert list(xs) == [1, 2, 3] and list(ys) == [1.0, 0.8, 0.7]
