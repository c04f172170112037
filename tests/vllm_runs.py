"""What the vLLM rollout tests share: the session engine's arguments, short on-policy runs on
the shipped tiny models, and a rollout hook that records what it generated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# the vllm_student fixture's engine (tests/conftest.py), as --rollout-vllm-args gives them to a
# run's own engine: 16 blocks of 32 tokens of KV cache, and vLLM's stats on
ENGINE_ARGS = {"block_size": 32, "kv_cache_memory_bytes": 16 * 32 * 1024, "disable_log_stats": False}


def engine_flags() -> list[str]:
    return [f"--rollout-vllm-args={k}={json.dumps(v)}" for k, v in ENGINE_ARGS.items()]


def write_data(folder: Path, rows: int = 96) -> Path:
    """The first rows of the shipped tiny task (prompts of 20-31 tokens)."""
    from hpd.models.loading import asset_path

    lines = Path(asset_path("hpd:tiny/train.jsonl")).read_text().splitlines()[:rows]
    path = Path(folder) / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(out: Path, data: Path, **kw) -> dict:
    """Fully on-policy hpd on the tiny models with vLLM rollouts: the weights move enough in
    a step (lr 5e-3) that the student's greedy continuations change."""
    cfg = dict(teacher="hpd:tiny/teacher", student="hpd:tiny/student", data=str(data), out=str(out),
               backend="torch", method="hpd", steps=3, batch_size=16, max_length=128, lr=5e-3, warmup_ratio=0.0,
               lr_schedule="constant", progress=False, rollout_max_new_tokens=32, schedule={"lambda_start": 1.0},
               rollout_engine="vllm", seed=0)
    cfg.update(kw)
    return cfg


def flags(cfg: dict) -> list[str]:
    """`hpd distill` flags for a config of `config` (its schedule through a recipe file)."""
    out = []
    for key, value in cfg.items():
        if key == "schedule":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


class Recorder:
    """A rollout hook around another that keeps, per call, the step, the rows and their
    continuations; `before(loop, batch)` runs ahead of each call."""

    def __init__(self, inner, before=None):
        self.inner, self.before, self.calls = inner, before, []

    def __call__(self, loop, student, batch):
        if self.before is not None:
            self.before(loop, batch)
        out = self.inner(loop, student, batch)
        gens = [row[n:int(mask.sum())].tolist() for row, mask, n in
                zip(out["input_ids"], out["attention_mask"], out["prompt_lens"])]
        self.calls.append((loop.state.step, np.asarray(batch["rows"]).tolist(), gens))
        return out

    def by_row(self, step: int) -> dict[int, list[int]]:
        return {r: g for s, rows, gens in self.calls if s == step for r, g in zip(rows, gens)}


def weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def steps_of(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r and "skipped" not in r]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m hpd.cli.main ARGS` (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "hpd.cli.main", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a two-core machine
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
