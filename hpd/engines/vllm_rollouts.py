"""A vLLM engine that generates the student's rollouts in the training process.

The engine starts from the student's folder and is then loaded with the student's current
weights by reference (`load_weights`: vLLM's in-place `reload_weights` with the weights
under their transformers checkpoint names, then a reset of the prefix cache, whose blocks
were computed with the old weights). `hpd.train.rollout_vllm` decides when.

Rollouts here mirror hpd's transformers rollouts (`Backend.generate`): plain temperature
sampling unless top-p or top-k is set, a continuation stops only at the tokenizer's EOS
(included), and each request carries its own seed, so a row's continuation does not depend
on what else is in the batch (greedy: no seed, temperature 0).

Sizing: the KV cache must hold at least one sequence of `max_model_len` tokens, or vLLM
loads the model and then refuses to start (hpd.models.memory.sequence_kv_bytes is that
minimum). A cache smaller than a batch's sequences does not fail: vLLM preempts a sequence
and recomputes it later (slower, the same tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

from hpd.engines import vllm as engines
from hpd.models.memory import ENGINE_BLOCK


def block_size(options: engines.EngineOptions, cpu: bool) -> int:
    return int(options.extra.get("block_size") or ENGINE_BLOCK["cpu" if cpu else "cuda"])


def position_limit(folder: str) -> int:
    """The model's max_position_embeddings (0 where its config.json does not say)."""
    from hpd.models.loading import local_or_hub

    source = local_or_hub(folder)
    if not isinstance(source, Path):
        from huggingface_hub import hf_hub_download

        source = Path(hf_hub_download(source, "config.json")).parent
    return int(json.loads((source / "config.json").read_text()).get("max_position_embeddings") or 0)


class StudentEngine:
    """An engine on the student's architecture, loaded with the student's weights on request."""

    def __init__(self, engine: engines.Engine, eos: int):
        self.engine, self.eos = engine, int(eos)

    @classmethod
    def start(cls, folder: str, options: engines.EngineOptions, eos: int) -> StudentEngine:
        """The engine on `folder`, of options.max_model_len tokens (required). Rollouts
        as long as the run's rows may pass the model's max_position_embeddings, as the
        trainer's own forward does; vLLM allows that only when asked."""
        longer = options.max_model_len > position_limit(folder) > 0
        return cls(engines.start(folder, options, env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"} if longer else None),
                   eos)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def load_weights(self, weights) -> None:
        """Replace the engine's weights: `weights` is (name, tensor) pairs under the
        transformers checkpoint's names (the whole model: vLLM fuses q/k/v and gate/up
        itself and repacks each layer for its kernels)."""
        llm = self.engine.llm
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights), "is_checkpoint_format": True})
        llm.reset_prefix_cache()  # cached blocks hold keys and values of the old weights

    def generate(self, prompts: list[list[int]], max_tokens: list[int], *, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seeds=None) -> list[list[int]]:
        """Each prompt's continuation (token ids, ending at EOS or after its max_tokens);
        `seeds`: one per prompt, or None for greedy decoding."""
        from vllm import SamplingParams

        def params(i: int):
            common = dict(max_tokens=int(max_tokens[i]), ignore_eos=True, stop_token_ids=[self.eos],
                          detokenize=False)  # stop at the tokenizer's EOS only, as transformers rollouts do
            if seeds is None:
                return SamplingParams(temperature=0.0, **common)
            return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                  seed=int(seeds[i]), **common)

        outputs = self.engine.generate(prompts, [params(i) for i in range(len(prompts))])
        return [list(out.outputs[0].token_ids) for out in outputs]

    def shutdown(self) -> None:
        self.engine.shutdown()


def long_prompts(prompt_lens, where, max_model_len: int) -> str | None:
    """A line naming the rows whose prompt an engine of max_model_len cannot take (a prompt
    must be shorter than max_model_len), or None."""
    bad = [(w, n) for w, n in zip(where, prompt_lens) if n >= max_model_len]
    if not bad:
        return None
    shown = ", ".join(f"{w} ({n} tokens)" for w, n in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return (f"the rollout engine's max_model_len is {max_model_len} tokens and a prompt must be shorter: "
            f"{shown}{more}; raise --rollout-max-model-len, or shorten or drop these rows")


__all__ = ["StudentEngine", "long_prompts", "block_size", "position_limit"]
