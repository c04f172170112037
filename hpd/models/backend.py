"""The backend interface: what the training loop needs from torch or mlx.

A backend is a second implementation of this Protocol, never a second loop.
Arrays crossing the interface from the core are numpy; arrays going back into
`hpd.loss` are the backend's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass
class Outputs:
    """A model's outputs for a batch: logits (B, T, V), or final hidden states (B, T, H)
    with the output head (`hpd.objectives.heads.Head`) for the chunked loss."""

    logits: Any = None
    hidden: Any = None
    head: Any = None


LossFn = Callable[[Outputs], "tuple[Any, dict[str, float]]"]


class Backend(Protocol):
    name: str
    rank: int
    world_size: int
    # every rank takes part in a checkpoint's save and load (torch under torchrun: FSDP
    # shards gather collectively); False: rank 0 saves alone
    collective_checkpoint: bool
    # where the student runs: "cuda", "cpu", "mps" (torch), "gpu", "cpu" (mlx)
    device_type: str
    # the chunked loss's per-chunk function with `hpd.objectives.chunked.chunk_terms`'s
    # signature (a compiled version of it), or None for chunk_terms itself
    chunk_fn: Callable | None

    @property
    def lora(self) -> Any:
        """This backend's LoRA module: apply, set_adapters, adapters, counts, save_merged,
        check_supported, linear_names_at, load_quantized_base (hpd.backends.<name>.lora)."""
        ...

    def seed(self, seed: int) -> None: ...

    def load_tokenizer(self, path: str) -> Any: ...

    def load_model(self, path: str, *, trainable: bool, dtype: str, quantize: int = 0) -> Any: ...

    def vocab_size(self, model) -> int: ...

    def chunked_blocker(self, model) -> str | None:
        """Why the chunked loss cannot compute this model's logits exactly, or None."""
        ...

    def head_of(self, model) -> Any:
        """The output head as `hpd.objectives.heads.Head`: weight (dense or quantized), logit scale, soft-cap."""
        ...

    def to_arrays(self, batch: dict[str, np.ndarray]) -> dict[str, Any]: ...

    def forward(self, model, batch: dict[str, Any], *, hidden: bool = False) -> Outputs:
        """Outputs without gradient (teacher, evaluation)."""
        ...

    def forward_backward(self, model, batch: dict[str, Any], loss_fn: LossFn, *, hidden: bool = False
                         ) -> tuple[float, dict[str, float]]:
        """Student forward, loss_fn, backward; gradients accumulate until optimizer_step."""
        ...

    def make_optimizer(self, model, config) -> Any: ...

    def step_metrics(self) -> dict[str, float]:
        """What the loop adds to each step's record (torch: the graphs torch.compile built)."""
        ...

    def optimizer_step(self, model, optimizer, lr: float, max_grad_norm: float) -> float:
        """Clip, step, zero the gradients; returns the pre-clip global gradient norm. A NaN or
        Inf norm is returned without stepping (the loop then skips the step)."""
        ...

    def zero_grad(self, model, optimizer) -> None: ...

    def weights_finite(self, model) -> bool:
        """No NaN or Inf in this process's weights (local: no collective)."""
        ...

    def generate(self, model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False
                 ) -> list[list[int]]:
        """Continuations (token ids, without the prompt, cut after EOS): plain temperature
        sampling unless top_p/top_k are set, or greedy. Draws use the framework's RNG."""
        ...

    def full_weights(self, model) -> dict[str, Any]:
        """The model's whole weights under its transformers checkpoint's names, on every
        process: gathered where they are sharded, a LoRA student's adapters merged (into
        copies: the model trains on as it is). What an inference engine loads to generate
        the student's rollouts (hpd.train.rollout_vllm)."""
        ...

    def save_model(self, model, tokenizer, folder: Path) -> None:
        """config.json, safetensors weights, tokenizer files: a folder both ecosystems load."""
        ...

    def save_training_state(self, model, optimizer, folder: Path) -> None: ...

    def load_training_state(self, model, optimizer, folder: Path) -> None: ...

    def rng_state(self) -> dict[str, np.ndarray]: ...

    def set_rng_state(self, state: dict[str, np.ndarray]) -> None: ...

    def all_reduce_sum(self, value: float) -> float: ...

    def barrier(self) -> None: ...


