"""`hpd eval --lm-eval`: lm-evaluation-harness on a student folder, with a task defined in
local files that the test writes (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hpd.cli.main import cli

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (pip install 'hpd-distill[lm-eval]')")

DOCS = [{"question": "the cat sat on", "answer": 0}, {"question": "one two three", "answer": 1},
        {"question": "what is the dog", "answer": 0}, {"question": "how many apples", "answer": 1},
        {"question": "the dog ran to", "answer": 0}]


@pytest.fixture
def task_dir(tmp_path) -> Path:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "hpd_choice.yaml").write_text(f"""task: hpd_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
doc_to_choice: ["a mat", "four"]
metric_list:
  - metric: acc
""")
    return folder


@pytest.fixture
def spy(monkeypatch):
    """The harness's real simple_evaluate, with the arguments hpd passed recorded."""
    calls = []
    real = lm_eval.simple_evaluate

    def wrapped(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", wrapped)
    return calls


def run_cli(model, task_dir, *extra):
    args = ["eval", "--model", str(model), "--lm-eval", "hpd_choice", "--lm-eval-include", str(task_dir),
            "--device", "cpu", "--json", *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])  # the harness writes its bars to stderr


def test_local_task_on_a_torch_student(assets, task_dir, spy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = run_cli(assets["student"], task_dir, "--limit", "3", "--batch-size", "2")
    assert report["lm-eval/hpd_choice/samples"] == 3  # --limit reached the harness
    assert 0.0 <= report["lm-eval/hpd_choice/acc"] <= 1.0
    assert report["lm-eval/hpd_choice/acc"] * 3 == pytest.approx(round(report["lm-eval/hpd_choice/acc"] * 3))
    assert spy[0]["batch_size"] == 2 and spy[0]["limit"] == 3
    assert spy[0]["model_args"]["pretrained"] == str(assets["student"])


def test_local_task_on_an_mlx_export(assets, task_dir, tmp_path, monkeypatch):
    """An MLX-trained student is exported as a transformers folder: the harness runs it as it is."""
    pytest.importorskip("mlx_lm")
    import hpd

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "mlx-run"
    hpd.distill({"teacher": str(assets["teacher"]), "student": str(assets["student"]), "data": str(assets["data"]),
                 "out": str(out), "backend": "mlx", "steps": 1, "batch_size": 4, "progress": False})
    report = run_cli(out, task_dir)
    assert report["lm-eval/hpd_choice/samples"] == len(DOCS)
    assert "lm-eval/hpd_choice/acc" in report


def test_unknown_task_and_missing_inputs(assets, task_dir):
    result = CliRunner().invoke(cli, ["eval", "--model", str(assets["student"]), "--lm-eval", "no_such_task",
                                      "--lm-eval-include", str(task_dir)])
    assert result.exit_code != 0 and "knows no task 'no_such_task'" in result.output
    result = CliRunner().invoke(cli, ["eval", "--model", str(assets["student"])])
    assert result.exit_code == 2 and "give --data, --lm-eval TASKS, or both" in result.output
