"""What `--resume` may change: N steps, resume, N more steps must equal 2N steps.

A resumed run compares its config with the one its checkpoint was written under. Fields
that shape the trajectory (the method, the learning rate and its schedule, the number of
steps, the data, the models, ...) must match: a cosine schedule stretched by a larger
--steps gives different weights. Such a change is refused unless --allow-config-change,
which prints it. A new --steps or --epochs passes as it is when the steps already taken
would have been taken alike (a constant learning rate and schedule). Every change,
allowed or operational (--save-every, --eval-every, the device, ...), is appended to
config_history.jsonl; config.yaml stays the first run's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

HISTORY = "config_history.jsonl"
# Fields a resume may change freely: they decide where and how often things are written
# or measured, or how the same numbers are computed, not which numbers.
OPERATIONAL = frozenset({
    "out", "resume", "overwrite", "allow_config_change", "progress", "save_every", "keep_checkpoints",
    "eval_data", "eval_every", "eval_generate", "eval_extractor", "eval_metric", "max_bad_steps", "device", "parallel",
    "teacher_placement", "gradient_checkpointing", "chunked", "chunk_size", "teacher_offload",
    "rollout_kv_cache_mb",
})
_IGNORED = frozenset({"resume", "overwrite", "allow_config_change"})
LENGTH = frozenset({"steps", "epochs"})


def saved_config(checkpoint_state: dict, run_dir: Path) -> dict | None:
    """The config the checkpoint was written under: its own copy, else the run's config.yaml."""
    config = checkpoint_state.get("config")
    if isinstance(config, dict):
        return config
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None
    return None


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """field -> (saved, current) for every field that differs."""
    return {k: (saved.get(k), v) for k, v in current.items()
            if k not in _IGNORED and k in saved and saved[k] != v}


def describe(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def check_resume(saved: dict | None, current: dict, *, allow: bool, step: int,
                 same_start=None) -> dict[str, tuple]:
    """The changes to record; raises ValueError on a change that breaks the N + N = 2N promise
    unless `allow`. A longer or shorter run (--steps, --epochs) is no such change when
    `same_start()` says the new config would have taken the steps already taken alike (a
    constant learning rate, say)."""
    if saved is None:
        return {}
    changes = config_changes(saved, current)
    breaking = {k: v for k, v in changes.items() if k not in OPERATIONAL}
    if breaking and set(breaking) <= LENGTH and same_start is not None and same_start():
        breaking = {}
    if breaking and not allow:
        raise ValueError(
            f"--resume from step {step} with a changed config: {describe(breaking)}. The resumed run "
            "would no longer equal an uninterrupted one; pass --allow-config-change to accept the change "
            "(it is recorded in config_history.jsonl), or write to a new --out"
        )
    return changes


def same_start(saved: dict, cfg, saved_total: int, total: int, done: int) -> bool:
    """Whether a run of `total` steps takes its first `done` steps as the saved run of
    `saved_total` did: the same learning rate and the same schedule decisions at each."""
    if saved_total == total:
        return True
    from hpd.train.config import DistillConfig
    from hpd.train.loop import learning_rate
    from hpd.train.schedule import Schedule

    old = DistillConfig.from_dict({k: v for k, v in saved.items() if k in DistillConfig.field_names()})

    def lr(c, n, s):
        return learning_rate(s, n, c.lr, kind=c.lr_schedule, warmup_ratio=c.warmup_ratio, min_ratio=c.min_lr_ratio)

    def schedule(c, n):
        return Schedule(c.schedule_config(), method=c.method, method_params=dict(c.method_params), total_steps=n,
                        seed=c.seed)

    a, b = schedule(old, saved_total), schedule(cfg, total)
    return all(lr(old, saved_total, s) == lr(cfg, total, s) and a.plan(s).as_metrics() == b.plan(s).as_metrics()
               for s in range(done))


def record_history(run_dir: Path, step: int, changes: dict[str, tuple], command: str) -> Path:
    path = Path(run_dir) / HISTORY
    entry = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
             "changes": {k: {"before": a, "after": b} for k, (a, b) in changes.items()}}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
    return path


__all__ = ["check_resume", "config_changes", "describe", "record_history", "same_start", "saved_config",
           "OPERATIONAL"]
