"""The embedded default: the shipped tiny models, `hpd eval`, the tiny recipe, `hpd plot`."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from conftest import write_answers
from hpd.cli.main import cli

from hpd.tasks import tiny

pytestmark = pytest.mark.slow


def test_eval_reports_the_teachers_card_accuracy():
    manifest = tiny.load_manifest()
    n = manifest["eval_first"]
    args = ["eval", "--model", "hpd:tiny/teacher", "--teacher", "hpd:tiny/teacher",
            "--data", "hpd:tiny/held.jsonl", "--limit", str(n), "--json", "--no-progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    expected = manifest["models"]["teacher"]["held_accuracy_first40"]
    assert abs(report["accuracy"] - expected) <= 1 / n + 1e-9, (report, expected)
    assert report["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    assert 1.0 <= report["perplexity"] < 2.0


def test_eval_table_and_bad_extractor():
    args = ["eval", "--model", "hpd:tiny/student", "--data", "hpd:tiny/held.jsonl", "--limit", "4",
            "--no-progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0 and "accuracy" in result.output and "perplexity" in result.output
    bad = CliRunner().invoke(cli, args + ["--extractor", "nope"])
    assert bad.exit_code != 0 and "allowed" in bad.output


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_tiny_recipe_short_run_and_plot(tmp_path, backend):
    if backend == "mlx":
        pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
    out = tmp_path / "run"
    args = ["distill", "--recipe", "tiny", "--backend", backend, "--out", str(out), "--steps", "4",
            "--eval-generate", "4", "--eval-every", "2", "--no-progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "held-out exact match: student" in result.output and "teacher" in result.output
    assert result.output.count(f"exported the student to {out}") == 1
    assert "warning: recipe tiny is tuned for 600 steps" in result.output  # 4 steps squeeze it
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r and r["step"] == 2 for r in records)
    png = tmp_path / "curves.png"
    plot = CliRunner().invoke(cli, ["plot", str(out), str(out), "--out", str(png)], catch_exceptions=False)
    assert plot.exit_code == 0, plot.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_rejects_a_folder_without_metrics(tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "metrics.jsonl" in result.output


@pytest.mark.slow
def test_eval_limit_limits_every_metric_and_tokens_are_whole(assets, tmp_path):
    from transformers import AutoTokenizer

    from hpd.data.batches import load_dataset

    held = write_answers(tmp_path / "held.jsonl")
    args = ["eval", "--model", str(assets["student"]), "--teacher", str(assets["teacher"]), "--data",
            str(held), "--limit", "3", "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    first3 = load_dataset(held, AutoTokenizer.from_pretrained(assets["tokenizer"]), 1024).examples[:3]
    assert report["rows"] == 3
    assert report["tokens"] == sum(sum(e.loss_mask) for e in first3)
    table = CliRunner().invoke(cli, args, catch_exceptions=False).stdout
    assert re.search(r"^tokens\s+\d+$", table, re.M), table
