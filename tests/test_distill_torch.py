"""`hpd distill --backend torch` end to end on tiny random models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import distill_config, nan_teacher, write_answers

import hpd
from hpd.cli.main import cli
from hpd.data.batches import load_dataset
from hpd.data.examples import DataError
from hpd.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


base_config = distill_config


def token_kl(teacher_dir, student, assets) -> float:
    """Mean token-level KL(teacher || student) on the training data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd.data.batches import collate

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    if isinstance(student, (str, Path)):
        student = AutoModelForCausalLM.from_pretrained(student)
    student.eval()
    data = load_dataset(assets["data"], tok, 1024)
    batch = {k: torch.from_numpy(v) for k, v in collate(data.examples, tok.pad_token_id).items()}
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return hpd.loss("fkl", s, t, batch["targets"])[1]["fkl"]


def weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# hpd moves only the data token and one sample per position, so on random-text data
# (not the teacher's own) the full-vocabulary KL falls more slowly than under fkl
@pytest.mark.parametrize("method, kl_ratio", [("hpd", 0.95), ("fkl", 0.7)])
def test_cli_end_to_end(assets, tmp_path, method, kl_ratio):
    out = tmp_path / "run"
    before = token_kl(assets["teacher"], assets["student"], assets)
    args = ["distill", "--backend", "torch", "--teacher", str(assets["teacher"]), "--student",
            str(assets["student"]), "--data", str(assets["data"]), "--out", str(out), "--method", method,
            "--steps", "12", "--batch-size", "8", "--lr", "1e-2", "--eval-data", str(assets["held"]),
            "--eval-every", "6", "--no-progress", "--chunked", "off"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "done: 12 steps" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        for key in ("loss", "lr", "tokens", "tokens_per_s", "grad_norm"):
            assert np.isfinite(r[key]), (key, r)
    assert any("eval/kl" in r for r in records)
    if method == "hpd":
        assert 0.0 <= steps[-1]["hpd/sample_differs"] <= 1.0
    after = token_kl(assets["teacher"], out, assets)
    assert after < before * kl_ratio, (before, after)
    card = (out / "README.md").read_text()
    assert method in card and "sha256" in card
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 10000.0
    assert (out / "config.yaml").exists() and (out / "generation_config.json").exists()


def test_export_loads_in_transformers_and_mlx(assets, tmp_path):
    result = hpd.distill(base_config(assets, tmp_path / "run", steps=3))
    student = result["student"].eval()
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 88]])
    with torch.no_grad():
        expected = student(input_ids=ids).logits.numpy()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tok = mlx_lm.load(str(tmp_path / "run"))
    assert tok.encode("the cat sat") == result["tokenizer"].encode("the cat sat")
    mlx_logits = np.array(model(mx.array(ids.numpy())).astype(mx.float32))
    np.testing.assert_allclose(mlx_logits, expected, atol=1e-4, rtol=0)  # float32, different kernels


def test_resume_equals_uninterrupted(assets, tmp_path):
    full = hpd.distill(base_config(assets, tmp_path / "full", steps=6, save_every=3))
    # a second run that stops at step 3 is the first run's checkpoint at step 3
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    assert ckpt.latest_checkpoint(part).name == "step-3"
    resumed = hpd.distill(base_config(assets, part, steps=6, save_every=3, resume=True))
    assert resumed["steps"] == 6
    assert max_weight_diff(weights(full["student"]), weights(resumed["student"])) == 0.0


def _given_samples(vocab):
    def samples(batch):  # a function of each row alone, so independent of how rows are batched
        t = batch["targets"]
        return np.where(t >= 0, (t * 7 + 3) % vocab, 0)

    return samples


@pytest.mark.parametrize("method", ["hpd", "fkl"])
def test_accumulation_equivalence(assets, tmp_path, method):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(assets["tokenizer"]))
    hooks = {"given_samples": _given_samples(vocab)} if method == "hpd" else {}
    big = hpd.distill(base_config(assets, tmp_path / "big", steps=2, batch_size=8, grad_accum=1,
                                  method=method), **hooks)
    small = hpd.distill(base_config(assets, tmp_path / "small", steps=2, batch_size=1, grad_accum=8,
                                    method=method), **hooks)
    assert big["metrics"]["tokens"] == small["metrics"]["tokens"]
    np.testing.assert_allclose(big["metrics"]["loss"], small["metrics"]["loss"], rtol=1e-5)
    # summation order differs (one batch of 8 vs 8 of 1); Adam's normalised update turns that
    # rounding in near-zero gradients into ~1e-6 of weight, against updates of ~3e-3 per step
    assert max_weight_diff(weights(big["student"]), weights(small["student"])) < 1e-5


@pytest.mark.parametrize("method", ["fkl", "jsd"])
def test_chunked_run_equals_plain_run(assets, tmp_path, method):
    plain = hpd.distill(base_config(assets, tmp_path / "plain", steps=2, method=method, chunked="off"))
    chunked = hpd.distill(base_config(assets, tmp_path / "chunked", steps=2, method=method, chunked="on",
                                      chunk_size=7))
    np.testing.assert_allclose(plain["metrics"]["loss"], chunked["metrics"]["loss"], rtol=1e-5)
    # Adam's normalised update turns float32 rounding in near-zero gradients into ~1% of
    # one step (lr 3e-3); a wrong gradient would move weights by whole steps
    assert max_weight_diff(weights(plain["student"]), weights(chunked["student"])) < 1e-4


def test_interrupted_checkpoint_write_leaves_previous_whole(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    hpd.distill(base_config(assets, out, steps=2))
    previous = ckpt.latest_checkpoint(out)
    assert previous.name == "step-2"
    from hpd.backends.torch import TorchBackend

    def killed(self, model, optimizer, folder):
        (Path(folder) / "optimizer.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(TorchBackend, "save_training_state", killed)
    with pytest.raises(KeyboardInterrupt):
        hpd.distill(base_config(assets, out, steps=4, resume=True, allow_config_change=True))
    assert ckpt.latest_checkpoint(out) == previous
    monkeypatch.undo()
    resumed = hpd.distill(base_config(assets, out, steps=4, resume=True, allow_config_change=True))
    assert resumed["steps"] == 4


def test_nan_loss_stops_with_checkpoint(assets, tmp_path):
    bad = nan_teacher(assets, tmp_path / "nan_teacher")
    out = tmp_path / "run"
    from hpd.train.loop import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="consecutive"):
        hpd.distill(base_config(assets, out, teacher=str(bad), steps=10, max_bad_steps=3))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped", 0) for r in records) == 3
    assert ckpt.latest_checkpoint(out) is not None


def test_padded_vocabularies(assets, tmp_path):
    """A teacher with a padded embedding matrix over the same tokenizer distils fine."""
    from conftest import build_model

    padded = build_model(tmp_path / "padded", assets["tokenizer"], hidden=48, layers=1, vocab=384, seed=7)
    result = hpd.distill(base_config(assets, tmp_path / "run", teacher=str(padded), steps=2))
    assert np.isfinite(result["metrics"]["loss"])


def test_qwen2_tied_family(assets, tmp_path):
    result = hpd.distill(base_config(assets, tmp_path / "run", teacher=str(assets["qwen_teacher"]),
                                     student=str(assets["qwen_student"]), steps=2))
    assert np.isfinite(result["metrics"]["loss"])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True


# ---------------------------------------------------------------------- bad input


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines, message", [
    (['{"text": "the cat"}', '{"text": "a dog"', '{"text": "x"}'], ":2: not valid JSON"),
    (['{"text": "the cat"}', '{"prompt": "a"}'], ':2: "completion" must be a string'),
    (['{"text": "the cat"}', '["a"]'], ":2: expected a JSON object"),
    (['{"foo": 1}'], ':1: expected a "messages"'),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: messages has no assistant turn"),
    ([], "holds no rows"),
])
def test_bad_rows_stop_before_training(assets, tmp_path, lines, message):
    data = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        hpd.distill(base_config(assets, tmp_path / "run", data=str(data)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_reports_bad_row_with_file_and_line(assets, tmp_path):
    data = _write(tmp_path / "bad.jsonl", ['{"text": "the cat"}', "not json"])
    args = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]),
            "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert f"{data}:2" in result.output


def test_no_trainable_tokens(assets, tmp_path):
    data = _write(tmp_path / "d.jsonl", ['{"prompt": "the cat sat on a mat", "completion": "and"}'] * 4)
    with pytest.raises(DataError, match="no row has a trainable token"):
        hpd.distill(base_config(assets, tmp_path / "run", data=str(data), max_length=3))


def test_missing_model_folder(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hpd.distill(base_config(assets, tmp_path / "run", teacher=str(tmp_path / "nope")))


def test_mismatched_tokenizers(assets, tmp_path):
    from conftest import build_model, build_tokenizer

    other_tok = tmp_path / "other_tok"
    build_tokenizer(other_tok, vocab_size=300)
    other = build_model(tmp_path / "other", other_tok, hidden=32, layers=1)
    # auto would distil across the two tokenizers (tests/test_cross.py); same refuses them
    with pytest.raises(ValueError, match="tokenizers differ.*--teacher-tokenizer cross"):
        hpd.distill(base_config(assets, tmp_path / "run", teacher=str(other), teacher_tokenizer="same"))


def test_existing_output_folder_is_not_overwritten(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        hpd.distill(base_config(assets, out, steps=1))
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="hpd did not write .*precious.txt"):
        hpd.distill(base_config(assets, out, steps=1, overwrite=True))
    assert (out / "precious.txt").read_text() == "keep me"
    # an earlier run in the folder is replaced
    (out / "precious.txt").unlink()
    hpd.distill(base_config(assets, out, steps=1))
    first = (out / "model.safetensors").stat().st_mtime_ns
    hpd.distill(base_config(assets, out, steps=2, overwrite=True))
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]


def test_export_command(assets, tmp_path):
    out = tmp_path / "run"
    hpd.distill(base_config(assets, out, steps=2))
    target = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(out / "checkpoints" / "step-2"), "--out", str(target)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json"} <= names
    assert "optimizer.safetensors" not in names and "trainer_state.json" not in names
    again = CliRunner().invoke(cli, ["export", str(out / "checkpoints" / "step-2"), "--out", str(target)])
    assert again.exit_code != 0 and "--overwrite" in again.output


@pytest.mark.slow
def test_model_card_of_a_checkpoint_export_has_its_metrics(assets, tmp_path):
    out = tmp_path / "run"
    hpd.distill(base_config(assets, out, steps=3, save_every=1, keep_checkpoints=3))
    target = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(out / "checkpoints" / "step-2"), "--out", str(target)])
    assert result.exit_code == 0, result.output
    card = (target / "README.md").read_text()
    table = card.split("## Final metrics")[1].split("## Command")[0]
    step2 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert step2["step"] == 2
    assert f"| loss | {step2['loss']:.6g} |" in table and f"| kl | {step2['kl']:.6g} |" in table


@pytest.mark.slow
def test_distill_output(assets, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]), "--data",
            str(assets["data"]), "--out", str(out), "--steps", "2", "--batch-size", "2", "--grad-accum", "2",
            "--chunked", "off", "--no-progress"]
    text = CliRunner().invoke(cli, args, catch_exceptions=False).output
    assert "2 steps of 4 sequences (2 per batch x 2 accumulated x 1 process)" in text
    assert len(re.findall("export", text)) == 1, text
    seconds = float(re.search(r"exported the student to \S+ \((\d+\.\d) s\)", text).group(1))
    assert seconds < 30


@pytest.mark.slow
def test_resumed_run_prints_before_and_after_accuracy(assets, tmp_path):
    out = tmp_path / "run"
    common = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]), "--data",
              str(assets["data"]), "--eval-data", str(write_answers(tmp_path / "held.jsonl")), "--eval-generate", "2",
              "--max-length", "64", "--rollout-max-new-tokens", "4", "--out", str(out), "--batch-size", "4",
              "--chunked", "off", "--no-progress", "--save-every", "1"]
    first = CliRunner().invoke(cli, [*common, "--steps", "1"], catch_exceptions=False)
    assert "held-out exact match: student" in first.output
    resumed = CliRunner().invoke(cli, [*common, "--steps", "2", "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "held-out exact match: student" in resumed.output and "before" in resumed.output
