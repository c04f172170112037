"""`hpd distill --rollout-engine vllm` as a user runs it, each in a process of its own (the run
starts and shuts down its own engine, and a shutdown ends every vLLM engine in a process):

- an engine that fails to start stops the run with one line, before anything is written;
- an engine that dies mid-run stops it with one line and a checkpoint of the last finished
  step, and the resumed run (a new engine, a new process) ends with the same weights as an
  uninterrupted run on the session's engine; metrics.jsonl holds rollout/engine,
  rollout/tokens_per_s and rollout/sync_s for every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from vllm_runs import ENGINE_ARGS, Recorder, config, engine_flags, flags, max_diff, steps_of, weights, write_data

import hpd
from hpd.train.rollout import Rollouts, Sampling
from hpd.train.rollout_vllm import VllmRollouts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")

# the first engine call at step 3 (after 2 steps of 2 micro-batches) finds its engine shut down
FAIL_AT_CALL = 5
_KILLER = """
import sys
from hpd.engines.vllm_rollouts import StudentEngine

original, calls = StudentEngine.generate, [0]

def generate(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {fail_at}:  # the engine goes away under the run, as a crashed engine core would
        self.engine.llm.llm_engine.engine_core.shutdown()
    return original(self, *args, **kwargs)

StudentEngine.generate = generate
from hpd.cli.main import cli
cli(sys.argv[1:])
"""


def _hpd(args: list[str], *, fail_at: int = 0) -> subprocess.CompletedProcess:
    code = textwrap.dedent(_KILLER.format(fail_at=fail_at)) if fail_at else "from hpd.cli.main import cli; cli()"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _distill(cfg: dict, tmp_path, *extra: str) -> list[str]:
    recipe = tmp_path / "schedule.yaml"
    recipe.write_text(json.dumps({"schedule": cfg["schedule"]}))
    return ["distill", "--recipe", str(recipe), *flags(cfg), *extra]


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_an_engine_that_fails_to_start_stops_the_run_in_one_line(tmp_path):
    data = write_data(tmp_path)
    out = tmp_path / "run"
    # vLLM's CPU attention takes blocks of a multiple of 32 tokens: it loads the model, then refuses
    result = _hpd(_distill(config(out, data), tmp_path, "--rollout-vllm-args", "block_size=16"))
    assert result.returncode == 1, result.stderr[-3000:]
    errors = _error_lines(result)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("Error: the vLLM rollout engine did not start (ValueError: ")
    assert "block size" in errors[0] and "--rollout-vllm-args block_size=16" in errors[0]
    assert not out.exists()  # nothing was written


def test_an_engine_failure_mid_run_checkpoints_and_the_resumed_run_finishes_the_same(vllm_student, tmp_path):
    data = write_data(tmp_path)
    cfg = config(tmp_path / "cli", data, steps=4, grad_accum=2)
    args = _distill(cfg, tmp_path, *engine_flags())
    failed = _hpd(args, fail_at=FAIL_AT_CALL)
    assert failed.returncode == 1, failed.stderr[-3000:]
    errors = _error_lines(failed)
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert errors[0].startswith("Error: the vLLM rollout engine failed at step 3 (AssertionError: ")
    assert "checkpoints/step-2; resume with: " in errors[0] and errors[0].endswith("--resume")
    checkpoints = sorted(p.name for p in (tmp_path / "cli" / "checkpoints").iterdir())
    assert checkpoints == ["step-2"]  # the last finished step, nothing of the failed one
    assert [r["step"] for r in steps_of(tmp_path / "cli")] == [1, 2]

    resumed = _hpd([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = steps_of(tmp_path / "cli")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["rollout/engine"] == "vllm" and r["rollout/tokens_per_s"] > 0 and r["rollout/sync_s"] > 0
               for r in steps)

    # the same run, uninterrupted, on the session's engine (the same engine arguments)
    assert vllm_student.engine.options.extra == ENGINE_ARGS
    hook = Recorder(Rollouts(Sampling(max_new_tokens=32), VllmRollouts(vllm_student, owned=False)))
    hpd.distill(config(tmp_path / "uninterrupted", data, steps=4, grad_accum=2), rollout=hook)
    assert [r["rollout/tokens"] for r in steps] == [r["rollout/tokens"] for r in steps_of(tmp_path / "uninterrupted")]
    assert max_diff(weights(tmp_path / "cli"), weights(tmp_path / "uninterrupted")) == 0.0
