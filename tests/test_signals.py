"""SIGTERM and SIGINT mid-run: the step finishes, a checkpoint is written, the exit status
is 143 / 130, the message says how to resume, and the resumed run equals an
uninterrupted one. A second signal exits at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hpd
from hpd.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

STEPS = 40


def args(assets, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "hpd.cli.main", "distill", "--teacher", str(assets["teacher"]),
            "--student", str(assets["student"]), "--data", str(assets["data"]), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "4", "--lr", "3e-3", "--chunked", "off",
            "--save-every", "100", "--no-progress", *extra]


def wait_for_records(path: Path, n: int, proc, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("no progress")


def weights_of(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "full"
    hpd.distill({"teacher": str(assets["teacher"]), "student": str(assets["student"]),
                 "data": str(assets["data"]), "out": str(out), "steps": STEPS, "batch_size": 4, "lr": 3e-3,
                 "chunked": "off", "save_every": 100, "progress": False})
    return weights_of(out)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_is_exact(assets, tmp_path, uninterrupted, sig, status):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args(assets, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_records(out / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err and "Aborted!" not in err
    step = len((out / "metrics.jsonl").read_text().splitlines())  # every finished step is kept
    assert 3 <= step < STEPS
    latest = ckpt.latest_checkpoint(out)
    assert latest.name == f"step-{step}"
    last_line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last_line.startswith("Error:") and signal.Signals(sig).name in last_line
    assert str(latest) in last_line and "--resume" in last_line
    # the printed command resumes the run, which ends where an uninterrupted one does
    resumed = subprocess.run(args(assets, out, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    final = weights_of(out)
    assert final.keys() == uninterrupted.keys()
    for k in final:
        np.testing.assert_array_equal(final[k], uninterrupted[k], err_msg=k)


SECOND_SIGNAL = """
import os, signal, sys, time
from hpd.train.interrupt import StopOnSignal
with StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("first handled", stop.signum, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still running", flush=True)
"""


def test_second_signal_exits_at_once():
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143
    assert "first handled 15" in proc.stdout and "still running" not in proc.stdout
    assert "again: exiting now" in proc.stderr
    assert time.time() - started < 4.5
