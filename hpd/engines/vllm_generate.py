"""`hpd generate --backend vllm`: a model's responses from a vLLM engine.

`Generator` answers the one call `hpd.train.rollout.generate_file` makes of a backend,
`generate(model, tokenizer, prompts, ...)`, on an engine (`hpd.engines.vllm.start`), so the
written file, its resume and its rows are those of `--backend torch`. The sampling
follows the torch backend's: greedy, or plain temperature sampling unless top-p / top-k
are set; a response ends at the tokenizer's EOS only (kept, as there), whatever else the
model's generation config lists. The engine's seed makes a run's samples repeatable.
"""

from __future__ import annotations

from hpd.engines.vllm import Engine, import_vllm


class Generator:
    """The backend `generate_file` writes through, over a started engine."""

    name = "vllm"

    def __init__(self, engine: Engine):
        self.engine = engine
        self.limit = engine.max_model_len  # tokens a sequence may hold, prompt included
        self.cut = 0  # responses cut short by that limit

    def sampling(self, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 greedy: bool):
        vllm = import_vllm()
        eos = tokenizer.eos_token_id
        return vllm.SamplingParams(max_tokens=int(max_new_tokens), temperature=0.0 if greedy else float(temperature),
                                   top_p=1.0 if greedy else float(top_p), top_k=0 if greedy else int(top_k),
                                   ignore_eos=True, stop_token_ids=[] if eos is None else [int(eos)],
                                   detokenize=False)

    def generate(self, model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, greedy: bool = False) -> list[list[int]]:
        """Continuations of token-id prompts (`model` is unused: the engine holds it)."""
        params = self.sampling(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, greedy=greedy)
        out = []
        for prompt, result in zip(prompts, self.engine.generate(prompts, params)):
            tokens = list(result.outputs[0].token_ids)
            if len(tokens) < max_new_tokens and len(prompt) + len(tokens) >= self.limit and \
                    tokens[-1:] != [tokenizer.eos_token_id]:
                self.cut += 1
            out.append(tokens)
        return out


__all__ = ["Generator"]
