"""A served teacher (`hpd distill --teacher http://127.0.0.1:PORT/v1`) against the session's one
vLLM server (the shipped tiny teacher, float32).

- parity: the first step's loss equals a torch-written store of the same k (fkl, rkl within
  1e-4 relative; hpd 3e-4, see tests/test_vllm_teacher.py), with and without prefetch, on
  the torch and the mlx backends, as one teacher or as named ones;
- refusals, before anything is written, in one line: another tokenizer than the student's,
  a model the server does not serve, an unreachable URL;
- faults: 503s are retried and change nothing; a server that dies mid-run (here its TCP front,
  which resets every open connection and then refuses, as a killed server's port does: the
  session keeps its one vLLM process) stops the run with a checkpoint and one line, and
  `--resume` ends exactly where an uninterrupted run does;
- a teacher of another tokenizer under --teacher-tokenizer cross, a store beside the server (the
  server scoring only the rollouts), and torchrun with 2 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_SERVED_NAME, corpus
from server_front import Front
from vllm_process import free_port

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

import hpd  # noqa: E402
from hpd.cli.main import cli  # noqa: E402
from hpd.models.loading import asset_path  # noqa: E402

STUDENT, DATA = asset_path("hpd:tiny/student"), asset_path("hpd:tiny/held.jsonl")


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def config(teacher: str, out: Path, **kw) -> dict:
    cfg = dict(teacher=teacher, student=STUDENT, data=DATA, out=str(out), steps=1, batch_size=16, max_length=64,
               progress=False, seed=0, lr=1e-3, method="fkl")
    cfg.update(kw)
    return cfg


def weights(result) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in result["student"].state_dict().items()}


def same_weights(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A torch-written store of the tiny teacher at the served teacher's default k (32), float32."""
    out = tmp_path_factory.mktemp("served") / "store"
    args = ["cache-teacher", "--teacher", asset_path("hpd:tiny/teacher"), "--data", DATA, "--out", str(out),
            "--top-k", "32", "--max-length", "64", "--logprob-bits", "32", "--batch-size", "32", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def reference(vllm_server, tmp_path_factory):
    """An uninterrupted 6-step hpd run from the server, without prefetch."""
    out = tmp_path_factory.mktemp("served") / "reference"
    result = hpd.distill(config(url(vllm_server), out, steps=6, batch_size=8, method="hpd", teacher_prefetch=0))
    return {"weights": weights(result), "out": out}


@pytest.mark.parametrize("method, rtol", [("fkl", 1e-4), ("rkl", 1e-4), ("hpd", 3e-4)])
def test_first_step_loss_equals_a_store_of_the_same_k(vllm_server, store, tmp_path, method, rtol):
    stored = hpd.distill(config("", tmp_path / "store", teacher_cache=str(store), method=method))
    served = hpd.distill(config(url(vllm_server), tmp_path / "served", method=method))
    assert served["metrics"]["loss"] == pytest.approx(stored["metrics"]["loss"], rel=rtol)
    assert served["metrics"]["teacher/wait_s"] >= 0 and served["metrics"]["teacher/retries"] == 0


def test_prefetch_sends_each_batch_once_and_changes_nothing(vllm_server, reference, tmp_path):
    front = Front(vllm_server)
    result = hpd.distill(config(front.url, tmp_path / "run", steps=6, batch_size=8, method="hpd", teacher_prefetch=2))
    assert same_weights(weights(result), reference["weights"]) == 0.0
    assert front.completions == 1 + 6  # the set-up's probe, then one request per step
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("teacher/wait_s" in r for r in records if "loss" in r)


def test_transient_faults_are_retried_and_change_nothing(vllm_server, reference, tmp_path, capfd):
    front = Front(vllm_server)
    front.fail = {2: 503, 3: 502}  # the first step's request (after the set-up's probe), and its retry
    result = hpd.distill(config(front.url, tmp_path / "run", steps=6, batch_size=8, method="hpd",
                                teacher_prefetch=0))
    assert same_weights(weights(result), reference["weights"]) == 0.0
    err = capfd.readouterr().err
    assert "/completions failed (HTTP 503); retry 1 of 5 in 0.5 s" in err
    assert "/completions failed (HTTP 502); retry 2 of 5 in 1 s" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["teacher/retries"] for r in records] == [2, 0, 0, 0, 0, 0]


def test_server_dies_mid_run_checkpoint_and_exact_resume(vllm_server, reference, tmp_path):
    front = Front(vllm_server)
    front.kill_after = 4  # the probe and three steps' requests; the fourth step's is refused
    out = tmp_path / "run"
    cfg = config(front.url, out, steps=6, batch_size=8, method="hpd", teacher_prefetch=1, teacher_retries=2)
    args = ["distill", *[f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "progress"],
            "--no-progress"]
    died = CliRunner().invoke(cli, args)
    assert died.exit_code == 1
    last = died.output.strip().splitlines()[-1]
    assert last.startswith("Error: teacher server") and "unreachable" in last and "connection refused" in last
    assert "stopped at step 3 of 6 with a checkpoint" in last and "--resume" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    front.kill_after = None
    front.start()  # the server is back
    resumed = CliRunner().invoke(cli, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    from safetensors.numpy import load_file

    final = load_file(str(out / "model.safetensors"))
    want = load_file(str(reference["out"] / "model.safetensors"))
    assert final.keys() == want.keys() and all(np.array_equal(final[k], want[k]) for k in final)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _cli_refusal(args: list[str], out: Path) -> str:
    result = CliRunner().invoke(cli, ["distill", *args, "--out", str(out), "--steps", "1", "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and not out.exists(), result.output
    return lines[0]


def test_refusals_before_anything_is_written(vllm_server, assets, tmp_path):
    other = _cli_refusal(["--teacher", url(vllm_server), "--student", str(assets["student"]), "--data",
                          str(assets["data"])], tmp_path / "a")
    assert f"({TINY_SERVED_NAME}) does not use the student's tokenizer" in other
    assert "--teacher-tokenizer cross" in other
    named = _cli_refusal(["--teacher", url(vllm_server) + "?model=big-teacher", "--student", STUDENT, "--data", DATA],
                         tmp_path / "b")
    assert f"serves {TINY_SERVED_NAME}, not 'big-teacher'" in named
    down = _cli_refusal(["--teacher", url(free_port()), "--student", STUDENT, "--data", DATA], tmp_path / "c")
    assert "is unreachable" in down and "connection refused" in down
    top = _cli_refusal(["--teacher", url(vllm_server), "--student", STUDENT, "--data", DATA, "--teacher-top-k", "65"],
                       tmp_path / "d")
    assert "--max-logprobs 65" in top
    hot = _cli_refusal(["--teacher", url(vllm_server), "--student", STUDENT, "--data", DATA, "--temperature", "2"],
                       tmp_path / "e")
    assert "temperature 1" in hot


def test_a_url_as_a_named_teacher(vllm_server, tmp_path):
    rows = Path(DATA).read_text().splitlines()[:96]
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({**json.loads(r), "teacher": "ab"[i % 2]}) + "\n" for i, r in enumerate(rows)))
    one = hpd.distill(config(url(vllm_server), tmp_path / "one", data=str(routed)))
    named = hpd.distill(config("", tmp_path / "named", data=str(routed),
                               teachers={"a": url(vllm_server), "b": url(vllm_server)}))
    assert named["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-6)
    assert {"teacher/a/wait_s", "teacher/b/wait_s"} <= set(named["metrics"])


def test_mlx_student(vllm_server, tmp_path):
    pytest.importorskip("mlx.core")
    on_torch = hpd.distill(config(url(vllm_server), tmp_path / "torch"))
    on_mlx = hpd.distill(config(url(vllm_server), tmp_path / "mlx", backend="mlx"))
    assert on_mlx["metrics"]["loss"] == pytest.approx(on_torch["metrics"]["loss"], rel=1e-5)
    assert on_mlx["metrics"]["grad_norm"] == pytest.approx(on_torch["metrics"]["grad_norm"], rel=1e-4)


def test_a_teacher_of_another_tokenizer(vllm_server, assets, tmp_path):
    """The assets' student (a 320-token BPE) from the tiny teacher (361 tokens), aligned by text."""
    texts = corpus(96, 3)
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": texts[2 * i], "completion": texts[2 * i + 1]}) + "\n"
                            for i in range(48)))
    common = dict(student=str(assets["student"]), data=str(data), batch_size=8, teacher_tokenizer="cross")
    live = hpd.distill(config(asset_path("hpd:tiny/teacher"), tmp_path / "live", **common))
    served = hpd.distill(config(url(vllm_server), tmp_path / "served", teacher_top_k=64, **common))
    assert served["metrics"]["cross/aligned"] == live["metrics"]["cross/aligned"] > 0.3
    # top 64 of 361 with the rest spread evenly, against the whole rows
    assert served["metrics"]["loss"] == pytest.approx(live["metrics"]["loss"], rel=0.02)


def test_torchrun_two_ranks_equal_one_process(vllm_server, tmp_path):
    """Each rank sends its own requests: 2 ranks x 4 rows == 1 process x 8 rows."""
    one = hpd.distill(config(url(vllm_server), tmp_path / "one", steps=3, batch_size=8, chunked="off"))
    hpd_script = Path(sys.executable).parent / "hpd"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(hpd_script),
           "distill", "--teacher", url(vllm_server), "--student", STUDENT, "--data", DATA, "--out",
           str(tmp_path / "two"), "--steps", "3", "--batch-size", "4", "--max-length", "64", "--seed", "0",
           "--lr", "0.001", "--method", "fkl", "--chunked", "off", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)
    from safetensors.numpy import load_file

    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5


def test_a_store_for_the_data_and_the_server_for_rollouts(vllm_server, store, tmp_path):
    schedule = {"lambda_schedule": "constant", "lambda_start": 0.5}
    hpd.distill(config(url(vllm_server), tmp_path / "run", teacher_cache=str(store), steps=6, batch_size=8,
                       method="hpd", schedule=schedule, rollout_max_new_tokens=8))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["schedule/on_policy"] for r in records}
    assert kinds == {0, 1}  # both kinds of step ran
    assert all(("teacher/wait_s" in r) == bool(r["schedule/on_policy"]) for r in records)
