"""Checkpoints and model folders from elsewhere: nothing is unpickled, nothing outside the
folder is followed, hostile state is named, export copies only the contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hpd.cli.main import cli

import hpd

pytestmark = pytest.mark.slow


def base_config(assets, out: Path, **kw) -> dict:
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), steps=2, batch_size=4, lr=3e-3, progress=False, chunked="off", seed=0)
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def run_dir(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("untrusted") / "run"
    hpd.distill(base_config(assets, out, steps=2, save_every=1, keep_checkpoints=2))
    return out


@pytest.fixture
def run(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, copy_function=shutil.copy2)
    return out


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def pickle_only(folder: Path) -> None:
    """Replace a folder's safetensors weights by a pytorch_model.bin pickle."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def test_resume_from_a_pickle_only_checkpoint_is_refused(assets, run, no_unpickling):
    pickle_only(run / "checkpoints" / "step-2")
    with pytest.raises(FileNotFoundError, match="no safetensors weights.*pytorch_model.bin is not loaded"):
        hpd.distill(base_config(assets, run, resume=True))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_pickle_only_model_folder_is_refused_by_both_backends(assets, tmp_path, backend, no_unpickling):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    folder = tmp_path / "model"
    shutil.copytree(assets["student"], folder)
    pickle_only(folder)
    from hpd.backends import get_backend

    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        get_backend(backend).load_model(str(folder), trainable=False)


def test_export_copies_only_the_contract(run, tmp_path, no_unpickling):
    step = run / "checkpoints" / "step-2"
    (step / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle payload")
    (step / "notes.txt").write_text("not part of a model")
    (step / "run.sh").write_text("echo hi")
    target = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(step), "--out", str(target)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in target.iterdir()}
    assert not names & {"pytorch_model.bin", "notes.txt", "run.sh", "optimizer.safetensors", "rng.safetensors",
                        "optimizer.json", "trainer_state.json"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names


def hostile_index(folder: Path, name: str) -> None:
    weights = folder / "model.safetensors"
    outside = folder.parent.parent / "x.safetensors"
    shutil.copy(weights, outside)
    from safetensors import safe_open

    with safe_open(str(weights), "np") as fh:
        keys = list(fh.keys())
    weights.unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for k in keys}}))


@pytest.mark.parametrize("name", ["../../x.safetensors", "/tmp/x.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(assets, tmp_path, name):
    folder = tmp_path / "a" / "model"
    shutil.copytree(assets["student"], folder)
    hostile_index(folder, name)
    with pytest.raises(ValueError, match="weight_map names .*refusing to follow it"):
        hpd.distill(base_config(assets, tmp_path / "run", student=str(folder)))


def test_symlinked_checkpoint_is_refused(assets, run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / "checkpoints" / "step-2", elsewhere)
    (run / "checkpoints" / "step-2").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="step-2 is a symbolic link"):
        hpd.distill(base_config(assets, run, resume=True))
    result = CliRunner().invoke(cli, ["export", str(run / "checkpoints" / "step-1"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output  # the intact one next to it still exports


def test_symlinked_file_inside_a_checkpoint_is_refused(assets, run, tmp_path):
    step = run / "checkpoints" / "step-2"
    (step / "rng.safetensors").rename(tmp_path / "rng.safetensors")
    (step / "rng.safetensors").symlink_to(tmp_path / "rng.safetensors")
    with pytest.raises(ValueError, match="rng.safetensors is a symbolic link"):
        hpd.distill(base_config(assets, run, resume=True))


@pytest.mark.parametrize("field, value", [
    ("step", "2"), ("step", -1), ("data.epoch", [1]), ("data.index", -5), ("loop.bad_steps", None),
    ("loop.step", 1.5), ("schedule.lambda_changes", {"a": 1}), ("loop", 3), ("total_steps", 0),
])
def test_hostile_state_names_file_and_field(assets, run, field, value):
    path = run / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    head, _, tail = field.partition(".")
    if tail:
        state[head][tail] = value
    else:
        state[head] = value
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=rf"trainer_state.json: field '{head}"):
        hpd.distill(base_config(assets, run, resume=True))


def test_state_that_is_not_json(assets, run):
    (run / "checkpoints" / "step-2" / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="trainer_state.json: not readable JSON"):
        hpd.distill(base_config(assets, run, resume=True))


def test_export_of_a_hostile_checkpoint_is_one_line(run, tmp_path):
    step = run / "checkpoints" / "step-2"
    state = json.loads((step / "trainer_state.json").read_text())
    state["step"] = -4
    (step / "trainer_state.json").write_text(json.dumps(state))
    result = CliRunner().invoke(cli, ["export", str(step), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "trainer_state.json: field 'step'" in result.output
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())
