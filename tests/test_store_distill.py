"""`hpd distill --teacher-cache` end to end: equal to the live teacher, across backends,
mixed with on-policy steps, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_model, build_tokenizer, write_rows
from hpd.cli.main import cli

import hpd

pytestmark = pytest.mark.slow

# Lossless full stores (k = V, float32 log-probs): training from them must follow the live
# teacher. Tolerances: 1e-5 on the weights when the same backend wrote the store (float32
# rounding of a few steps); 1e-4 across backends, whose teachers' log-probs differ ~1e-6.


def _write_store(assets, out: Path, backend: str, **kw) -> Path:
    args = ["cache-teacher", "--backend", backend, "--teacher", str(assets["teacher"]), "--data",
            str(assets["data"]), "--out", str(out), "--top-k", kw.pop("top_k", "320"), "--max-length", "64",
            "--logprob-bits", kw.pop("bits", "32"), "--examples-per-shard", "24", "--no-progress"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def stores(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-stores")
    out = {"torch": _write_store(assets, root / "torch", "torch")}
    try:
        import mlx.core  # noqa: F401

        out["mlx"] = _write_store(assets, root / "mlx", "mlx")
    except ImportError:
        pass
    return out


def _config(assets, out, **kw) -> dict:
    cfg = dict(student=str(assets["student"]), data=str(assets["data"]), out=str(out), steps=3, batch_size=4,
               lr=3e-3, max_length=64, progress=False, seed=0, chunked="on", chunk_size="7")
    cfg.update(kw)
    return cfg


def _weights(result) -> dict[str, np.ndarray]:
    model = result["student"]
    if result["backend"].name == "torch":
        return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _moved(a, b) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _distill(assets, out, **kw):
    return hpd.distill(_config(assets, out, **kw))


@pytest.mark.parametrize("method", ["fkl", "hpd"])
def test_training_from_the_store_equals_the_live_teacher(assets, stores, tmp_path, method):
    live = _distill(assets, tmp_path / "live", teacher=str(assets["teacher"]), method=method)
    cached = _distill(assets, tmp_path / "cached", teacher_cache=str(stores["torch"]), method=method,
                      eval_data=str(assets["held"]))
    assert "eval/loss" in cached["metrics"] and "eval/kl" not in cached["metrics"]  # no teacher to compare
    from transformers import AutoModelForCausalLM

    start = {k: v.numpy() for k, v in AutoModelForCausalLM.from_pretrained(assets["student"]).state_dict().items()}
    assert _moved(_weights(cached), start) > 1e-3  # it trained
    assert _max_diff(_weights(live), _weights(cached)) < 1e-5
    assert live["metrics"]["loss"] == pytest.approx(cached["metrics"]["loss"], rel=1e-5)


@pytest.mark.parametrize("writer, trainer", [("mlx", "torch"), ("torch", "mlx")])
def test_a_store_from_either_backend_trains_the_other(assets, stores, tmp_path, writer, trainer):
    if writer not in stores or trainer == "mlx" and "mlx" not in stores:
        pytest.skip("mlx is not installed")
    live = _distill(assets, tmp_path / "live", teacher=str(assets["teacher"]), method="fkl", backend=trainer)
    cached = _distill(assets, tmp_path / "cached", teacher_cache=str(stores[writer]), method="fkl",
                      backend=trainer)
    assert json.loads((Path(stores[writer]) / "index.json").read_text())["provenance"]["backend"] == writer
    assert _max_diff(_weights(live), _weights(cached)) < 1e-4


def test_mixed_schedule_uses_the_teacher_on_rollout_steps_only(assets, stores, tmp_path):
    # seed 0 at lambda 0.5: steps 2 and 4 of 4 train on rollouts
    mixed = dict(method="hpd", steps=4, schedule={"lambda_start": 0.5}, rollout_max_new_tokens=6)
    live = _distill(assets, tmp_path / "live", teacher=str(assets["teacher"]), **mixed)
    both = _distill(assets, tmp_path / "both", teacher=str(assets["teacher"]),
                    teacher_cache=str(stores["torch"]), **mixed)
    records = [json.loads(x) for x in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["schedule/on_policy"] for r in records if "schedule/on_policy" in r}) == [0, 1]
    assert _max_diff(_weights(live), _weights(both)) < 1e-5
    # a lossy store changes the offline steps only: proof that the store served them
    top8 = _write_store(assets, tmp_path / "top8", "torch", top_k="8", bits="16")
    lossy = _distill(assets, tmp_path / "lossy", teacher=str(assets["teacher"]), teacher_cache=str(top8), **mixed)
    assert _max_diff(_weights(live), _weights(lossy)) > 1e-6


def test_mixed_schedule_without_a_teacher_fails_before_training(assets, stores, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["distill", "--teacher-cache", str(stores["torch"]), "--student",
                                 str(assets["student"]), "--data", str(assets["data"]), "--out", str(out),
                                 "--recipe", _mixed_recipe(tmp_path), "--no-progress"])
    assert r.exit_code == 2 and "pass --teacher as well" in r.output, r.output
    assert not out.exists() or not any(out.iterdir())


def _mixed_recipe(tmp_path) -> str:
    path = tmp_path / "mixed.yaml"
    path.write_text("max_length: 64\nsteps: 2\nbatch_size: 4\nschedule:\n  lambda_start: 0.3\n")
    return str(path)


# ----------------------------------------------------------------------------- refusals


def _refused(assets, tmp_path, store, *extra, student=None):
    out = tmp_path / "refused"
    args = ["distill", "--teacher-cache", str(store), "--student", str(student or assets["student"]),
            "--data", str(assets["data"]), "--out", str(out), "--steps", "1", "--batch-size", "4",
            "--max-length", "64", "--no-progress", *extra]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert not out.exists() or not any(out.iterdir())  # nothing written
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


def test_refusals(assets, stores, tmp_path):
    store = stores["torch"]
    other = write_rows(tmp_path / "other.jsonl", 64, seed=9)
    r = CliRunner().invoke(cli, ["distill", "--teacher-cache", str(store), "--student", str(assets["student"]),
                                 "--data", str(other), "--out", str(tmp_path / "o"), "--max-length", "64",
                                 "--steps", "1", "--no-progress"])
    assert r.exit_code == 2 and "data_sha256 (the data file) differs" in r.output, r.output
    assert "max_length (--max-length) differs (store: 64, here: 32)" in _refused(
        assets, tmp_path, store, "--max-length", "32")
    assert "temperature (--temperature) differs" in _refused(assets, tmp_path, store, "--temperature", "2")
    assert "teacher_sha256 (the teacher) differs" in _refused(
        assets, tmp_path, store, "--teacher", str(assets["qwen_teacher"]))
    tok2 = tmp_path / "tok2"
    build_tokenizer(tok2, vocab_size=300)
    foreign = build_model(tmp_path / "foreign", tok2, hidden=32, layers=1, seed=7)
    assert "tokenizer_vocab_sha256 (the tokenizer's vocabulary) differs" in _refused(
        assets, tmp_path, store, student=foreign)


def test_refusals_of_damaged_stores(assets, stores, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(stores["torch"], broken)
    shard = broken / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert "shard is truncated" in _refused(assets, tmp_path, broken)
    (broken / "index.json").unlink()
    assert "no index.json" in _refused(assets, tmp_path, broken)
