"""Which engine generates a run's rollouts, chosen once at set-up.

The training backend's own `generate` (transformers on torch, mlx-lm on mlx), or an engine
started beside the models (`--rollout-engine vllm`: hpd.train.rollout_vllm). `plan` runs the
checks that need no model, before any loads; the starter it returns is called once the models
are loaded. The Loop sees only the rollout hook over the engine (hpd.train.rollout.Rollouts).
"""

from __future__ import annotations

from collections.abc import Callable

from hpd.train import rollout_vllm
from hpd.train.rollout import BackendRollouts


def plan(cfg, data) -> Callable:
    """(backend, tokenizer, say) -> the run's rollout engine, after this run's checks."""
    if rollout_vllm.wanted(cfg):
        options = rollout_vllm.prepare(cfg, data)
        return lambda backend, tokenizer, say: rollout_vllm.start(cfg, backend, tokenizer, options, say)
    name = "hf" if cfg.backend == "torch" else "mlx-lm"  # what metrics.jsonl calls it
    return lambda backend, tokenizer, say: BackendRollouts(name)


__all__ = ["plan"]
