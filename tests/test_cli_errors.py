"""Bad input on the command line: one line naming the file, field or flag, exit status 2,
never a traceback."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil

import pytest
from click.testing import CliRunner

from hpd.cli.main import cli

pytestmark = pytest.mark.slow


def distill_args(assets, tmp_path, **over):
    args = {"--teacher": str(assets["teacher"]), "--student": str(assets["student"]),
            "--data": str(assets["data"]), "--out": str(tmp_path / "run"), "--steps": "1",
            "--batch-size": "4", "--chunked": "off"}
    args.update(over)
    flat = ["distill", "--no-progress"]
    for k, v in args.items():
        flat += [k, v]
    return flat


def assert_one_line_error(result, *needles, status=2):
    out = result.output
    assert "Traceback" not in out, out
    assert result.exit_code == status, (result.exit_code, out, result.exception)
    errors = [ln for ln in out.splitlines() if ln.lower().startswith(("error", "usage error"))]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def copy_model(src, dst):
    """Everything of a model folder except its weights."""
    dst.mkdir()
    for p in src.iterdir():
        if not p.name.endswith(".safetensors"):
            shutil.copy(p, dst / p.name)
    return dst


def test_non_utf8_data_names_file_and_line(assets, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "the cat sat"}\n{"text": "caf\xe9 \xff"}\n')
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--data": str(data)}))
    assert_one_line_error(result, f"{data}:2", "UTF-8")


def test_data_path_that_is_a_folder(assets, tmp_path):
    folder = tmp_path / "data_dir"
    folder.mkdir()
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--data": str(folder)}))
    assert_one_line_error(result, str(folder), "folder")


def test_model_folder_without_weights(assets, tmp_path):
    student = copy_model(assets["student"], tmp_path / "no_weights")
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--student": str(student)}))
    assert_one_line_error(result, str(student), "safetensors")


def test_pickle_only_model_folder_is_refused(assets, tmp_path):
    # an unpicklable pytorch_model.bin: never handed to torch.load
    student = copy_model(assets["student"], tmp_path / "pickle_only")
    (student / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--student": str(student)}))
    assert_one_line_error(result, str(student), "safetensors", "pytorch_model.bin")


def test_truncated_safetensors_names_the_file(assets, tmp_path):
    student = copy_model(assets["student"], tmp_path / "truncated")
    blob = (assets["student"] / "model.safetensors").read_bytes()
    (student / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--student": str(student)}))
    assert_one_line_error(result, str(student / "model.safetensors"), "truncated")


def test_param_that_is_not_a_number(assets, tmp_path):
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--method": "jsd", "--param": "beta=abc"}))
    assert_one_line_error(result, "--param", "beta=abc")


def test_recipe_yaml_syntax_error_names_file_and_line(assets, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("method: hpd\nlr: [1e-5,\nsteps: 3\n")
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--recipe": str(recipe)}))
    assert_one_line_error(result, f"{recipe}:", "line")


def test_read_only_out(assets, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "run"
    if os.geteuid() == 0:  # root writes through permissions: make the write itself fail
        real_mkdir = pathlib.Path.mkdir

        def read_only(self, *args, **kwargs):
            if str(self).startswith(str(parent)):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    else:
        parent.chmod(0o555)
    try:
        result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--out": str(out)}))
    finally:
        parent.chmod(0o755)
    assert_one_line_error(result, "--out", str(out))


@pytest.mark.parametrize("command", ["distill", "eval", "generate"])
def test_device_cuda_without_cuda(assets, tmp_path, command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if command == "distill":
        args = distill_args(assets, tmp_path, **{"--device": "cuda"})
    elif command == "eval":
        args = ["eval", "--model", str(assets["student"]), "--data", str(assets["held"]), "--device", "cuda"]
    else:
        args = ["generate", "--model", str(assets["student"]), "--data", str(assets["held"]),
                "--out", str(tmp_path / "gen.jsonl"), "--device", "cuda"]
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, "--device cuda", "CUDA")


def test_nan_stop_has_no_traceback(assets, tmp_path):
    from conftest import nan_teacher

    bad = nan_teacher(assets, tmp_path / "nan_teacher")
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{
        "--teacher": str(bad), "--steps": "10", "--max-bad-steps": "2"}))
    assert_one_line_error(result, "consecutive", "checkpoints/step-0")


def test_empty_assistant_message_is_rejected_like_empty_completion(assets, tmp_path):
    data = tmp_path / "empty.jsonl"
    rows = [{"text": "the cat sat"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path, **{"--data": str(data)}))
    assert_one_line_error(result, f"{data}:2", "empty")


def test_ctrl_c_before_training_is_not_just_aborted(assets, tmp_path, monkeypatch):
    import hpd.train.run

    def interrupted(*args, **kwargs):  # Ctrl-C while models load, before the run's own handler
        raise KeyboardInterrupt

    monkeypatch.setattr(hpd.train.run, "distill", interrupted)
    result = CliRunner().invoke(cli, distill_args(assets, tmp_path))
    assert "Aborted!" not in result.output
    assert_one_line_error(result, "SIGINT", "nothing to resume", status=130)
