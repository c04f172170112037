"""Student rollouts, the schedule inside a run, and `hpd generate` (torch backend)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hpd.cli.main import cli
from rollout_checks import assert_rollout_targets, write_prompts

import hpd
from hpd.data.batches import collate, load_dataset
from hpd.backends import get_backend
from hpd.train.rollout import Sampling, rollout_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_student(assets):
    backend = get_backend("torch", SimpleNamespace(device="cpu", gradient_checkpointing=False))
    backend.seed(0)
    tok = backend.load_tokenizer(str(assets["student"]))
    model = backend.load_model(str(assets["student"]), trainable=False)
    return backend, model, tok


def _prompt_batch(assets, tok, n=4):
    data = load_dataset(assets["data"], tok, 256)
    prompts = [e for e in data.examples if e.prompt_len > 1][:n]
    return collate(prompts, tok.pad_token_id)


def test_rollout_targets_cover_generated_tokens_only(assets, torch_student):
    backend, model, tok = torch_student
    batch = _prompt_batch(assets, tok)
    out = rollout_batch(backend, model, tok, batch, Sampling(max_new_tokens=12, temperature=1.5), 256)
    assert_rollout_targets(batch, out, tok.eos_token_id, 12)


def test_teacher_scores_align_with_generated_tokens(assets, torch_student):
    backend, model, tok = torch_student
    batch = _prompt_batch(assets, tok, n=2)
    out = rollout_batch(backend, model, tok, batch, Sampling(max_new_tokens=8, temperature=1.5), 256)
    teacher = backend.load_model(str(assets["teacher"]), trainable=False)
    arrays = backend.to_arrays({k: v for k, v in out.items() if k not in ("generated_tokens", "generated_rows")})
    logits = backend.forward(teacher, arrays).logits
    _, metrics = hpd.loss("sft", logits, logits, arrays["targets"])
    # the same log-likelihood, one generated token at a time, each from its own prefix
    total, count = 0.0, 0
    for i in range(2):
        n_prompt, length = int(out["prompt_lens"][i]), int(out["attention_mask"][i].sum())
        ids = out["input_ids"][i]
        for t in range(n_prompt, length):
            with torch.no_grad():
                step_logits = teacher(input_ids=torch.tensor(ids[None, :t])).logits[0, -1]
            total -= torch.log_softmax(step_logits, -1)[int(ids[t])].item()
            count += 1
    assert metrics["tokens"] == count
    assert metrics["nll"] == pytest.approx(total / count, rel=1e-5)


def test_torch_generate_uses_plain_temperature_sampling(assets, torch_student, monkeypatch):
    backend, model, tok = torch_student
    seen = {}
    original = type(model).generate

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    backend.generate(model, tok, [[1, 5, 9]], max_new_tokens=3, temperature=0.7)
    assert seen["top_k"] == 0 and seen["do_sample"] is True and seen["temperature"] == 0.7


def _config(assets, out, schedule, **kw):
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), steps=4, batch_size=4, lr=1e-3, progress=False, chunked="off",
               rollout_max_new_tokens=8, schedule=schedule)
    cfg.update(kw)
    return cfg


def _run(assets, out, schedule, **kw):
    result = hpd.distill(_config(assets, out, schedule, **kw))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in records if "loss" in r]


def test_fully_on_policy_run(assets, tmp_path):
    result, steps = _run(assets, tmp_path / "run", {"lambda_start": 1.0})
    assert all(r["schedule/on_policy"] == 1 and r["rollout/tokens"] > 0 for r in steps)
    assert all(np.isfinite(r["loss"]) and r["rollout/tokens_per_s"] > 0 for r in steps)
    assert all(1 <= r["rollout/mean_length"] <= 8 for r in steps)  # rollout_max_new_tokens=8


def test_mixed_run_with_ramp_and_objective_switch(assets, tmp_path):
    schedule = {"lambda_schedule": "linear", "lambda_start": 0.0, "lambda_end": 0.5,
                "phases": [{"until": 0.5, "objectives": {"fkl": 1.0}},
                           {"objectives": {"hpd": 1.0, "sft": 0.1}}]}
    _, steps = _run(assets, tmp_path / "run", schedule, steps=6)
    assert [r["schedule/lambda"] for r in steps] == pytest.approx([0, 0.5 / 6, 1 / 6, 0.25, 2 / 6, 2.5 / 6])
    assert [r.get("schedule/w/fkl", 0) for r in steps] == [1, 1, 1, 0, 0, 0]
    assert [r.get("schedule/w/sft", 0) for r in steps] == [0, 0, 0, 0.1, 0.1, 0.1]
    assert "hpd/sample_differs" in steps[-1] and "sft/objective" in steps[-1] and "fkl" in steps[0]
    on_policy = [r["schedule/on_policy"] for r in steps]
    assert on_policy[0] == 0
    assert all(("rollout/tokens" in r) == bool(r["schedule/on_policy"]) for r in steps)


def test_rows_mix_run_keeps_data_rows_beside_rollouts(assets, tmp_path):
    """rollout_mix rows: every step generates for about half its rows and trains on the data of the
    others; the rollout rows are counted as such."""
    _, steps = _run(assets, tmp_path / "run", {"rollout_mix": "rows", "lambda_start": 0.5}, steps=6, batch_size=8)
    assert all(r["schedule/on_policy"] == 1 and r["schedule/rollout_share"] == 0.5 for r in steps)
    assert all(np.isfinite(r["loss"]) and 1 <= r["rollout/mean_length"] <= 8 for r in steps)
    rows = sum(r["rollout/tokens"] / r["rollout/mean_length"] for r in steps)
    assert 0 < rows < 6 * 8  # some rows, not all, were rollouts
    assert "hpd/sample_differs" in steps[-1]


def test_generate_writes_and_resumes(assets, tmp_path):
    prompts = write_prompts(tmp_path)
    out = tmp_path / "responses.jsonl"
    args = ["generate", "--model", str(assets["teacher"]), "--data", str(prompts), "--out", str(out),
            "--samples", "2", "--max-new-tokens", "6", "--no-progress", "--batch-size", "4"]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    # simulate an interruption: two rows lost and a torn last line
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert "wrote 2 rows" in again.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["source"]["line"], r["source"]["sample"]) for r in records]
    assert sorted(keys) == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert records[0]["prompt"] == "the cat sat" and isinstance(records[0]["completion"], str)
    assert records[-1]["messages"][-1]["role"] == "assistant"
    tok = get_backend("torch", SimpleNamespace(device="cpu")).load_tokenizer(str(assets["teacher"]))
    # the file is offline data for hpd distill (empty completions aside)
    load_dataset(out, tok, 256)


def test_transformers_rollouts_name_their_engine(assets, tmp_path):
    _, steps = _run(assets, tmp_path / "run", {"lambda_start": 1.0}, steps=2)
    assert all(r["rollout/engine"] == "hf" and r["rollout/sync_s"] == 0.0 for r in steps)


def test_a_failed_rollout_keeps_the_last_step_and_the_resumed_run_repeats_the_rest(assets, tmp_path):
    """An engine failure at step 3 (here transformers', made to fail): one line, a checkpoint
    of step 2 and nothing of step 3; the resumed run takes step 3's batches again."""
    from hpd.train.rollout import Rollouts
    from hpd.train.rollout import RolloutEngineError

    sampling = Sampling(max_new_tokens=8)
    hpd.distill(_config(assets, tmp_path / "full", {"lambda_start": 1.0}), rollout=Rollouts(sampling))
    inner, calls = Rollouts(sampling), []

    def failing(loop, student, batch):
        calls.append(loop.state.step)
        if loop.state.step == 2:
            raise RolloutEngineError("the engine failed at step 3 (it was made to)")
        return inner(loop, student, batch)

    with pytest.raises(RolloutEngineError) as err:
        hpd.distill(_config(assets, tmp_path / "part", {"lambda_start": 1.0}), rollout=failing)
    message = str(err.value)
    assert "\n" not in message and "checkpoints/step-2; resume with: hpd.distill(..., resume=True)" in message
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == ["step-2"]
    records = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    hpd.distill(_config(assets, tmp_path / "part", {"lambda_start": 1.0}, resume=True), rollout=Rollouts(sampling))
    from safetensors.numpy import load_file

    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "part"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
