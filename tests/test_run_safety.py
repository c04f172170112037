"""Nothing lost, nothing run twice: --overwrite, the output lock, metrics.jsonl across
resumes, non-finite gradients and weights, a full disk, changed configs on resume."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import distill_config

import hpd
from hpd.cli.main import cli
from hpd.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


def base_config(assets, out: Path, **kw) -> dict:
    return distill_config(assets, out, **{"steps": 2, **kw})


def weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    hpd.distill(base_config(assets, out, steps=2, save_every=1))
    return out


# ------------------------------------------------------------------------ --overwrite

@pytest.mark.parametrize("name, content", [
    ("README.md", "my own notes"),  # a file hpd writes too, changed by the user
    ("config.json", "{}"),
    ("my-weights.safetensors", "not hpd's"),
    ("tokenizer_notes.txt", "keep"),
    ("checkpoints/notes.txt", "keep"),
])
def test_overwrite_refuses_files_hpd_did_not_write(assets, tmp_path, finished_run, name, content):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / name).write_text(content)
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(FileExistsError, match=name.replace(".", r"\.")):
        hpd.distill(base_config(assets, out, steps=1, overwrite=True))
    assert (out / name).read_text() == content
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing  # not a file added or removed
    assert (out / "model.safetensors").exists()  # nothing of the earlier run was removed either


def test_overwrite_replaces_an_earlier_run(assets, tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, copy_function=shutil.copy2)  # keeps the recorded mtimes
    before = (out / "model.safetensors").read_bytes()
    hpd.distill(base_config(assets, out, steps=1, overwrite=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert (out / "model.safetensors").read_bytes() != before
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1]


def test_overwrite_refuses_a_folder_without_manifest(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("mine: 1\n")  # a name hpd uses, but hpd never wrote it here
    with pytest.raises(FileExistsError, match="config.yaml"):
        hpd.distill(base_config(assets, out, steps=1, overwrite=True))
    assert (out / "config.yaml").read_text() == "mine: 1\n"
    assert [p.name for p in out.iterdir()] == ["config.yaml"]  # no lock or manifest left in it


# ----------------------------------------------------------------------------- lock

HOLD_LOCK = """
import sys, time
from hpd.files.outdir import OutputLock
lock = OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_on_the_same_out_names_the_holder(assets, tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, copy_function=shutil.copy2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match=f"process {holder.pid}"):
            hpd.distill(base_config(assets, out, steps=2, save_every=1, resume=True))
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: its lock does not block
    result = hpd.distill(base_config(assets, out, steps=2, save_every=1, resume=True))
    assert result["steps"] == 2


def test_stale_lock_file_does_not_block_resume(assets, tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, copy_function=shutil.copy2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".hpd.lock").write_text(json.dumps({"pid": dead.pid, "host": "here", "command": "hpd distill"}))
    assert hpd.distill(base_config(assets, out, steps=2, save_every=1, resume=True))["steps"] == 2


# ---------------------------------------------------------------------- metrics.jsonl

def record_keys(out: Path) -> list[tuple]:
    keys = []
    for ln in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        keys.append((r["step"], "train" if "loss" in r else "eval"))
    return keys


def test_final_evaluation_recorded_once_when_a_finished_run_is_resumed(assets, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(assets, out, steps=3, save_every=2, eval_data=str(assets["held"]))
    hpd.distill(cfg)
    hpd.distill({**cfg, "resume": True})
    keys = record_keys(out)
    assert keys == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]


def test_records_once_after_a_kill_mid_line(assets, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(assets, out, steps=4, save_every=2, eval_data=str(assets["held"]))
    hpd.distill(cfg)
    # as if killed at step 3 of a second attempt, after a torn write: keep the step-2 checkpoint
    shutil.rmtree(out / "checkpoints" / "step-4")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    hpd.distill({**cfg, "resume": True})
    assert record_keys(out) == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]


# ------------------------------------------------------------- non-finite gradients

def test_nan_gradient_norm_skips_the_step_and_never_saves_nan(assets, tmp_path, monkeypatch):
    from hpd.backends.torch import TorchBackend
    from hpd.train.loop import NonFiniteLoss

    original = TorchBackend.forward_backward

    def nan_grads(self, model, batch, loss_fn, **kw):
        value, metrics = original(self, model, batch, loss_fn, **kw)  # a finite loss ...
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return value, metrics  # ... and a NaN gradient

    monkeypatch.setattr(TorchBackend, "forward_backward", nan_grads)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="gradient norm"):
        hpd.distill(base_config(assets, out, steps=5, max_bad_steps=3))
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records] == [True, True, True]
    # numbers or null, never strings: a finite loss whose gradient norm was NaN
    assert all(isinstance(r["loss"], float) and r["grad_norm"] is None for r in records)
    saved = ckpt.latest_checkpoint(out)
    assert saved.name == "step-0"
    from safetensors.numpy import load_file

    tensors = load_file(str(saved / "model.safetensors"))
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(assets["student"]).state_dict()
    for k, v in tensors.items():  # finite, and the NaN updates were never applied
        assert np.isfinite(v).all(), k
        np.testing.assert_array_equal(v, initial[k].numpy())


def test_checkpoint_is_never_written_from_non_finite_weights(assets, tmp_path):
    from transformers import AutoTokenizer

    from hpd.backends.torch import TorchBackend

    backend = TorchBackend()
    model = backend.load_model(str(assets["student"]), trainable=True)
    tok = AutoTokenizer.from_pretrained(assets["student"])
    opt = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = float("inf")
    state = {"data": {"epoch": 0, "index": 0}, "loop": {"step": 1, "bad_steps": 0, "skipped_steps": 0},
             "schedule": {"last_eval_step": None, "last_eval_loss": None, "lambda_changes": []}}
    with pytest.raises(ckpt.CheckpointError, match="NaN or Inf"):
        ckpt.save_checkpoint(tmp_path, 1, backend, model, tok, opt, state)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf"])
def test_lr_must_be_finite(assets, tmp_path, lr):
    with pytest.raises(ValueError, match="lr"):
        hpd.distill(base_config(assets, tmp_path / "run", lr=lr))
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(assets["teacher"]), "--student",
                                      str(assets["student"]), "--data", str(assets["data"]), "--out",
                                      str(tmp_path / "run2"), "--lr", lr])
    assert result.exit_code == 2 and "lr" in result.output


# --------------------------------------------------------------------------- full disk

def _full_disk_at(step: int):
    from hpd.backends.torch import TorchBackend

    original = TorchBackend.save_training_state

    def save(self, model, optimizer, folder):
        if f"-step-{step}-" in Path(folder).name:
            (Path(folder) / "optimizer.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "optimizer.safetensors"))
        return original(self, model, optimizer, folder)

    return save


def test_full_disk_cleans_up_and_names_the_latest_intact_checkpoint(assets, tmp_path, monkeypatch):
    from hpd.backends.torch import TorchBackend

    monkeypatch.setattr(TorchBackend, "save_training_state", _full_disk_at(4))
    out = tmp_path / "run"
    for attempt in range(2):  # a retry leaves nothing behind either
        with pytest.raises(ckpt.CheckpointError, match="disk is full.*latest intact checkpoint is .*step-2"):
            hpd.distill(base_config(assets, out, steps=4, save_every=2, resume=attempt > 0))
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]


def test_full_disk_on_the_command_line_is_one_line(assets, tmp_path, monkeypatch):
    from hpd.backends.torch import TorchBackend

    monkeypatch.setattr(TorchBackend, "save_training_state", _full_disk_at(2))
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]), "--data",
            str(assets["data"]), "--out", str(out), "--steps", "2", "--batch-size", "4", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "no intact checkpoint" in errors[0]
    assert list((out / "checkpoints").iterdir()) == []


# ------------------------------------------------------------------ resume and config

def test_resume_with_changed_steps_is_refused(assets, tmp_path):
    out = tmp_path / "run"
    hpd.distill(base_config(assets, out, steps=4, save_every=2, lr_schedule="cosine"))
    shutil.rmtree(out / "checkpoints" / "step-4")
    original = (out / "config.yaml").read_text()
    for change in ({"steps": 6}, {"lr": 1e-3}, {"method": "fkl"}, {"lr_schedule": "linear"},
                   {"schedule": {"phases": [{"objectives": {"fkl": 1.0}}]}}):
        cfg = {**base_config(assets, out, steps=4, save_every=2, resume=True, lr_schedule="cosine"), **change}
        with pytest.raises(ValueError, match=f"{next(iter(change))} .*--allow-config-change"):
            hpd.distill(cfg)
    assert (out / "config.yaml").read_text() == original
    assert ckpt.latest_checkpoint(out).name == "step-2"


def test_allowed_config_change_is_printed_and_kept(assets, tmp_path, capfd):
    out = tmp_path / "run"
    hpd.distill(base_config(assets, out, steps=4, save_every=2))
    shutil.rmtree(out / "checkpoints" / "step-4")
    original = (out / "config.yaml").read_text()
    capfd.readouterr()
    hpd.distill(base_config(assets, out, steps=6, save_every=2, resume=True, allow_config_change=True))
    err = capfd.readouterr().err
    assert "steps 4 -> 6" in err
    assert (out / "config.yaml").read_text() == original  # the first run's, untouched
    history = [json.loads(ln) for ln in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and history[-1]["changes"]["steps"] == {"before": 4, "after": 6}


def test_resume_with_operational_changes_only_is_accepted(assets, tmp_path):
    out = tmp_path / "run"
    full = hpd.distill(base_config(assets, out / "a", steps=4, save_every=2))
    part = out / "b"
    hpd.distill(base_config(assets, part, steps=4, save_every=2))
    shutil.rmtree(part / "checkpoints" / "step-4")
    resumed = hpd.distill(base_config(assets, part, steps=4, save_every=1, keep_checkpoints=3, resume=True))
    a, b = weights(full["student"]), weights(resumed["student"])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_longer_run_at_constant_lr_resumes_exactly(assets, tmp_path, capfd):
    # extending a constant-learning-rate run changes none of the steps already taken
    common = dict(lr_schedule="constant", save_every=2)
    hpd.distill(base_config(assets, tmp_path / "split", steps=2, **common))
    capfd.readouterr()
    resumed = hpd.distill(base_config(assets, tmp_path / "split", steps=4, resume=True, **common))
    assert "steps 2 -> 4" in capfd.readouterr().err
    straight = hpd.distill(base_config(assets, tmp_path / "straight", steps=4, **common))
    a, b = weights(resumed["student"]), weights(straight["student"])
    assert all(np.array_equal(a[k], b[k]) for k in a)
