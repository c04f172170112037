"""Student rollouts, the schedule inside a run, and `hpd generate` on the mlx backend
(the counterparts of tests/test_rollouts.py), plus the mlx sampler against transformers'.

Tolerances:
- teacher NLL of a rollout from one forward against token-by-token scoring: 1e-5 relative
  (float32; the same model on the same prefixes, only the batch shape differs);
- sampled-token frequencies against the distribution transformers' temperature, top-k and
  top-p warpers define: 0.015 absolute per token over 20000 draws (the standard error of a
  frequency is at most 0.0035 there).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pip install 'hpd-distill[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pip install 'hpd-distill[mlx]')")

from click.testing import CliRunner  # noqa: E402
from hpd.cli.main import cli  # noqa: E402
from rollout_checks import assert_rollout_targets, write_prompts  # noqa: E402

import hpd  # noqa: E402
from hpd.data.batches import collate, load_dataset  # noqa: E402
from hpd.train.rollout import Sampling, rollout_batch  # noqa: E402

pytestmark = pytest.mark.mlx


def mlx_backend():
    from hpd.backends.mlx import MlxBackend

    return MlxBackend()


@pytest.fixture(scope="module")
def mlx_student(assets):
    backend = mlx_backend()
    backend.seed(0)
    tok = backend.load_tokenizer(str(assets["student"]))
    model = backend.load_model(str(assets["student"]), trainable=False, dtype="float32")
    return backend, model, tok


def _prompt_batch(assets, tok, n=4):
    data = load_dataset(assets["data"], tok, 256)
    prompts = [e for e in data.examples if e.prompt_len > 1][:n]
    batch = collate(prompts, tok.pad_token_id)
    assert len(set(batch["prompt_lens"].tolist())) > 1, "the rows should have prompts of different lengths"
    return batch


# ----------------------------------------------------------------------------- rollouts


def test_rollout_targets_cover_generated_tokens_only(assets, mlx_student):
    backend, model, tok = mlx_student
    batch = _prompt_batch(assets, tok)
    out = rollout_batch(backend, model, tok, batch, Sampling(max_new_tokens=12, temperature=1.5), 256)
    assert_rollout_targets(batch, out, tok.eos_token_id, 12)
    # the batch stays right-padded, as the mlx backend needs
    backend.to_arrays({k: v for k, v in out.items() if k not in ("generated_tokens", "generated_rows")})


def test_teacher_scores_align_with_generated_tokens(assets, mlx_student):
    backend, model, tok = mlx_student
    batch = _prompt_batch(assets, tok, n=3)
    out = rollout_batch(backend, model, tok, batch, Sampling(max_new_tokens=8, temperature=1.5), 256)
    teacher = backend.load_model(str(assets["teacher"]), trainable=False, dtype="float32")
    arrays = backend.to_arrays({k: v for k, v in out.items() if k not in ("generated_tokens", "generated_rows")})
    logits = backend.forward(teacher, arrays).logits
    _, metrics = hpd.loss("sft", logits, logits, arrays["targets"])
    # the same log-likelihood, one generated token at a time, each from its own prefix
    total, count = 0.0, 0
    for i in range(len(out["input_ids"])):
        n_prompt, length = int(out["prompt_lens"][i]), int(out["attention_mask"][i].sum())
        ids = out["input_ids"][i]
        for t in range(n_prompt, length):
            step_logits = teacher(mx.array(ids[None, :t].astype(np.int32)))[0, -1]
            total -= (step_logits - mx.logsumexp(step_logits))[int(ids[t])].item()
            count += 1
    assert metrics["tokens"] == count
    assert metrics["nll"] == pytest.approx(total / count, rel=1e-5)


# ----------------------------------------------------------------------------- generate


def _greedy_without_cache(model, prompt, n, eos):
    ids, out = list(prompt), []
    for _ in range(n):
        token = int(mx.argmax(model(mx.array([ids]))[0, -1]).item())
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def test_generate_rows_of_different_lengths(assets, mlx_student):
    """More rows than mlx-lm prefills at once (8), prompts of 1 to 12 tokens: batched greedy
    equals row-by-row greedy without a KV cache; a row stops right after EOS while the
    others go on."""
    backend, model, tok = mlx_student
    rng = np.random.default_rng(0)
    prompts = [[tok.bos_token_id] + rng.integers(4, len(tok), size=n).tolist() for n in range(12)]
    want = [_greedy_without_cache(model, p, 6, tok.eos_token_id) for p in prompts]
    got = backend.generate(model, tok, prompts, max_new_tokens=6, greedy=True)
    assert got == want
    assert backend.generate(model, tok, prompts, max_new_tokens=6, temperature=0.0) == want

    # EOS: pretend the third greedy token of row 0 is the end of sequence
    eos = want[0][2]
    fake = SimpleNamespace(eos_token_id=eos)
    cut = backend.generate(model, fake, prompts, max_new_tokens=6, greedy=True)
    for row, full in zip(cut, want):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert row == expected
    assert len(cut[0]) == 3


def _transformers_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(torch.zeros((1, 1), dtype=torch.long), torch.tensor(logits[None], dtype=torch.float32))
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (0.7, 4, 1.0),
                                                     (0.5, 0, 0.6), (1.5, 5, 0.8), (1.0, 50, 1.0)])
def test_sampler_matches_transformers_warpers(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p on the tempered distribution, as transformers'
    generate does; top_k above the vocabulary means no cut."""
    from hpd.backends.mlx.generation import make_sampler

    logits = np.log(np.array([0.30, 0.22, 0.15, 0.10, 0.08, 0.06, 0.04, 0.03, 0.015, 0.005], np.float32))
    want = _transformers_distribution(logits, temperature, top_k, top_p)
    mx.random.seed(1)
    sampler = make_sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    draws = np.array(sampler(mx.broadcast_to(mx.array(logits), (20000, len(logits)))))
    got = np.bincount(draws, minlength=len(logits)) / len(draws)
    np.testing.assert_allclose(got, want, atol=0.015)
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want > 0)), "a filtered token was drawn"


def test_sampler_top_p_uses_the_tempered_distribution():
    """p = (0.5, 0.3, 0.2) at T = 0.5 is (0.66, 0.24, 0.10): the 0.6-nucleus is the top token
    alone (untempered it would hold two)."""
    from hpd.backends.mlx.generation import make_sampler

    sampler = make_sampler(temperature=0.5, top_p=0.6)
    logprobs = mx.broadcast_to(mx.log(mx.array([0.5, 0.3, 0.2])), (2000, 3))
    assert np.array(sampler(logprobs)).tolist() == [0] * 2000
    greedy = make_sampler(greedy=True)
    assert np.array(greedy(mx.log(mx.array([[0.2, 0.5, 0.3]])))).tolist() == [1]


def test_generate_sampling_follows_the_seed(assets, mlx_student):
    backend, model, tok = mlx_student
    prompts = [[1, 40, 41], [1, 7, 8, 9, 10, 11]]
    runs = []
    for seed in (3, 3, 4):
        backend.seed(seed)
        runs.append(backend.generate(model, tok, prompts, max_new_tokens=10, temperature=1.0, top_k=20))
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ----------------------------------------------------------------------------- runs


def _run(assets, out, schedule, backend="mlx", **kw):
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), backend=backend, steps=4, batch_size=4, max_length=64, lr=1e-3, progress=False,
               chunked="off", rollout_max_new_tokens=8, schedule=schedule)
    cfg.update(kw)
    result = hpd.distill(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in records if "loss" in r]


MIXED = {"lambda_schedule": "linear", "lambda_start": 0.0, "lambda_end": 0.5,
         "phases": [{"until": 0.5, "objectives": {"fkl": 1.0}},
                    {"objectives": {"hpd": 1.0, "sft": 0.1}}]}


@pytest.fixture(scope="module")
def mixed_mlx_run(assets, tmp_path_factory):
    return _run(assets, tmp_path_factory.mktemp("mixed") / "run", MIXED, steps=6, seed=7)[1]


@pytest.mark.slow
def test_fully_on_policy_run(assets, tmp_path):
    result, steps = _run(assets, tmp_path / "run", {"lambda_start": 1.0})
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["schedule/on_policy"] == 1 and r["schedule/lambda"] == 1.0 for r in steps)
    assert all(r["rollout/tokens"] > 0 and r["rollout/tokens_per_s"] > 0 for r in steps)
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in steps)
    # rollouts are at most 8 new tokens per row: the loss covers at most 4 x 8 tokens
    assert all(r["tokens"] <= 4 * 8 for r in steps)
    assert json.loads((tmp_path / "run" / "hpd_export.json").read_text())["backend"] == "mlx"


@pytest.mark.slow
def test_mixed_run_with_ramp_and_objective_switch(mixed_mlx_run):
    steps = mixed_mlx_run
    assert [r["schedule/lambda"] for r in steps] == pytest.approx([0, 0.5 / 6, 1 / 6, 0.25, 2 / 6, 2.5 / 6])
    assert [r.get("schedule/w/fkl", 0) for r in steps] == [1, 1, 1, 0, 0, 0]
    assert [r.get("schedule/w/hpd", 0) for r in steps] == [0, 0, 0, 1, 1, 1]
    assert [r.get("schedule/w/sft", 0) for r in steps] == [0, 0, 0, 0.1, 0.1, 0.1]
    assert [r["schedule/phase"] for r in steps] == [0, 0, 0, 1, 1, 1]
    assert "hpd/sample_differs" in steps[-1] and "sft/objective" in steps[-1] and "fkl" in steps[0]
    on_policy = [r["schedule/on_policy"] for r in steps]
    assert on_policy[0] == 0
    assert all(("rollout/tokens" in r) == bool(r["schedule/on_policy"]) for r in steps)
    assert all(np.isfinite(r["loss"]) for r in steps)


@pytest.mark.slow
def test_schedule_decisions_equal_on_torch_and_mlx(assets, tmp_path, mixed_mlx_run):
    pytest.importorskip("torch")
    _, torch_steps = _run(assets, tmp_path / "torch", MIXED, backend="torch", steps=6, seed=7)

    def decisions(steps):
        return [{k: v for k, v in r.items() if k.startswith("schedule/")} for r in steps]

    assert decisions(torch_steps) == decisions(mixed_mlx_run)
    on_policy = [r["schedule/on_policy"] for r in mixed_mlx_run]
    assert 0 < sum(on_policy), "seed 7 should give at least one on-policy step (else the check is weak)"
    assert [("rollout/tokens" in r) for r in torch_steps] == [("rollout/tokens" in r) for r in mixed_mlx_run]


@pytest.mark.slow
def test_generate_writes_and_resumes(assets, tmp_path):
    prompts = write_prompts(tmp_path)
    out = tmp_path / "responses.jsonl"
    args = ["generate", "--backend", "mlx", "--model", str(assets["teacher"]), "--data", str(prompts),
            "--out", str(out), "--samples", "2", "--max-new-tokens", "6", "--no-progress", "--batch-size", "4",
            "--top-k", "20", "--temperature", "0.8"]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "wrote 6 rows" in first.output
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    # simulate an interruption: two rows lost and a torn last line
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "wrote 2 rows" in again.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.loads(x) for x in lines[:4]] == records[:4], "rows already written must stay as they were"
    keys = [(r["source"]["line"], r["source"]["sample"]) for r in records]
    assert sorted(keys) == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert len(set(keys)) == len(keys)
    assert records[0]["prompt"] == "the cat sat" and isinstance(records[0]["completion"], str)
    assert records[-1]["messages"][-1]["role"] == "assistant"
    assert records[-1]["messages"][0] == {"role": "user", "content": "how many apples"}
    tok = mlx_backend().load_tokenizer(str(assets["teacher"]))
    # the file is offline data for hpd distill (empty completions aside)
    load_dataset(out, tok, 256)

    greedy = tmp_path / "greedy.jsonl"
    args = ["generate", "--backend", "mlx", "--model", str(assets["teacher"]), "--data", str(prompts),
            "--out", str(greedy), "--max-new-tokens", "6", "--no-progress", "--greedy"]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    pytest.importorskip("torch")
    torch_greedy = tmp_path / "torch_greedy.jsonl"
    args = [a if a != "mlx" else "torch" for a in args]
    args[args.index(str(greedy))] = str(torch_greedy)
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    assert greedy.read_text() == torch_greedy.read_text(), "greedy responses must not depend on the backend"
