"""benchmarks.when_hpd_helps: the report's definitions, and a smoke run of two methods, a handful of steps."""

import json

import pytest

from benchmarks import sums_report as report
from benchmarks import when_hpd_helps


def test_spike_and_series_definitions():
    assert report.spikes([1.0] * 25) == 0
    assert report.spikes([1.0] * 20 + [3.5, 1.0, 2.9]) == 1  # only > 3x the median of the 20 before
    # small rollout-step gradients followed by an offline step: a spike only if kinds are mixed up
    mixed, kinds = [1.0] * 20 + [0.2] * 20 + [1.0], [0] * 20 + [1] * 20 + [0]
    assert report.spikes(mixed) == 1 and report.spikes(mixed, kinds) == 0
    records = [{"step": 0, "eval/accuracy": 0.1},
               {"step": 1, "loss": 2.0, "grad_norm": 1.0, "tokens": 100, "tokens_per_s": 50.0},
               {"step": 2, "loss": 1.0, "grad_norm": 0.5, "tokens": 100, "tokens_per_s": 100.0,
                "rollout/seconds": 3.0, "rollout/tokens": 40, "schedule/on_policy": 1, "hpd/neg_w_y": 0.2},
               {"step": 2, "eval/accuracy": 0.5, "eval/kl": 0.3}]
    s = report.series(records)
    assert s["seconds"] == [2.0, 6.0] and s["on_policy"] == [0, 1]
    assert s["evals"] == [{"step": 0, "seconds": 0.0, "accuracy": 0.1, "kl": None},
                          {"step": 2, "seconds": 6.0, "accuracy": 0.5, "kl": 0.3}]
    assert s["diagnostics"]["hpd/neg_w_y"] == [(2, 0.2)]
    params = {"student": 10, "teacher": 100}
    # (6*10 + 2*100) * (100 + 2*5) twice, plus a rollout of 40 tokens and 2 prompts of 5
    assert report.flops(records, params, 5.0, 2) == 260 * 110 * 2 + 2 * 10 * (40 + 10)


@pytest.mark.slow
def test_smoke_two_methods(tmp_path, keep_torch_threads):
    results = when_hpd_helps.main(["--methods", "sft", "hpd", "--steps", "4", "--seeds", "0", "--eval-every", "2",
                                   "--eval-generate", "3", "--final-rows", "4", "--samples", "2", "--sample-rows", "2",
                                   "--threads", "1", "--out", str(tmp_path)])
    assert [r["method"] for r in results["runs"]] == ["sft", "hpd"]
    for r in results["runs"]:
        assert 0.0 <= r["greedy"] <= 1.0 and 0.0 <= r["sampled"] <= 1.0 and r["kl_teacher_text"] >= 0.0
        assert r["series"]["steps"] == [1, 2, 3, 4] and [e["step"] for e in r["series"]["evals"]] == [0, 2, 4]
        assert r["flops"] > 0 and r["seconds"] > 0
        assert abs(sum(r["styles"].values()) - 1.0) < 1e-9
    hpd_run = results["runs"][1]
    assert len(hpd_run["series"]["diagnostics"]["hpd/sample_differs"]) == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["plan"]["steps"] == 4 and len(saved["runs"]) == 2
    table = (tmp_path / "results.md").read_text()
    for needle in ("| sft |", "| hpd |", "| teacher |", "HPD diagnostics", "spike"):
        assert needle in table
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
