"""Generation on mlx: mlx-lm's batched generator with a KV cache, and a sampler that filters
in transformers' order so both backends sample the same distribution."""

from __future__ import annotations

import mlx.core as mx


def make_sampler(*, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False):
    """logprobs (B, V) -> token ids (B,), drawn with mlx's global RNG: softmax(logits / T)
    restricted to the top_k tokens (0: all; k >= V: all, as transformers clamps it) and then
    to the smallest set whose tempered probability reaches top_p (the token that crosses
    top_p included)."""
    if greedy or temperature <= 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0: off)")

    def sample(logprobs):
        logits = logprobs.astype(mx.float32) * (1.0 / temperature)
        vocab = logits.shape[-1]
        if 0 < top_k < vocab:
            kth = mx.sort(logits, axis=-1)[..., vocab - top_k: vocab - top_k + 1]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if top_p < 1.0:
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # tempered log-probabilities
            ordered = mx.sort(logits, axis=-1)  # ascending
            mass_above = mx.cumsum(mx.exp(ordered), axis=-1, reverse=True, inclusive=False)
            dropped = (mass_above >= top_p).sum(axis=-1, keepdims=True)  # never all: the top has 0 above
            threshold = mx.take_along_axis(ordered, dropped, axis=-1)
            logits = mx.where(logits < threshold, -mx.inf, logits)
        return mx.random.categorical(logits, axis=-1)

    return sample


def generate(model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, greedy: bool = False):
    """Continuations of token-id prompts (rows of any lengths), cut after EOS (kept, as in
    the torch backend), by mlx-lm's batched generator with a KV cache. Plain temperature
    sampling unless top_p < 1 or top_k > 0; greedy (or temperature 0) takes the argmax.
    The filters follow transformers' order (temperature, then top-k, then top-p on the
    tempered distribution), not mlx-lm's make_sampler (top-p on the untempered one)."""
    from mlx_lm.generate import BatchGenerator

    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    eos = tokenizer.eos_token_id
    sampler = make_sampler(temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
    gen = BatchGenerator(model, max_tokens=max_new_tokens, stop_tokens=[[eos]] if eos is not None else None,
                         sampler=sampler)
    try:
        uids = gen.insert([[int(t) for t in p] for p in prompts], [max_new_tokens] * len(prompts))
        tokens: dict[int, list[int]] = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(int(r.token))
    finally:
        gen.close()
    return [tokens[u] for u in uids]
