"""torch.compile on the torch backend (--compile): the models' forwards and the chunked loss's
per-chunk function.

- The student's and the teacher's forwards (the decoder for hidden states, the whole model
  for logits) are compiled with static shapes. Each micro-batch's length is padded up to a
  bucket (--compile-buckets: a multiple of N tokens, or the next power of two) and the
  outputs cut back, so a run compiles at most one graph per bucket and grad mode, however
  its lengths vary. Padding goes at the end of each row (input id 0, attention mask 0;
  packed rows get position 0, a segment of their own): a causal model's outputs at the
  real positions do not depend on it.
- hpd.objectives.chunked.chunk_terms, the per-chunk vocabulary work of the chunked loss (the student's
  logits, both softmaxes, the rule, the logit gradient and its pullback through the head)
  is compiled once with a dynamic number of positions, so neither the batch's supervised
  positions nor the last, shorter chunk recompile it. The loss normaliser, which changes
  every step, is applied outside it.

Every graph that dynamo hands to inductor is counted (`Compiler.graphs`, by what was
compiled); the loop logs the total as compile/graphs in metrics.jsonl, so a run whose
count keeps rising is recompiling. Compiled and uncompiled steps agree to float32 rounding
(tests/test_compile_torch.py). Sampling methods that draw the student's sample inside the
chunk (no given samples, no uniforms) draw from inductor's RNG, not eager torch's.

auto compiles on CUDA only: on CPU, inductor's first steps of each shape spend seconds in a
C++ compiler, and the short chat shape measured no faster compiled (benchmarks/results/issue-23).
"""

from __future__ import annotations

import math
import sys
from collections import Counter


def enabled(mode: str, device) -> bool:
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def bucket(length: int, spec: str) -> int:
    """The padded length of a `length`-token batch under `spec` (pow2, or a multiple of N)."""
    if spec == "pow2":
        return max(16, 1 << max(0, length - 1).bit_length())
    step = int(spec)
    return -(-length // step) * step


def bucket_count(max_length: int, spec: str) -> int:
    if spec == "pow2":
        return max(1, math.ceil(math.log2(max(max_length, 16))) - 3)
    return -(-max_length // int(spec))


class Compiler:
    """The compiled callables of one run and the count of graphs compiled."""

    def __init__(self, spec: str = "64", max_length: int = 1024, strict: bool = False):
        import torch

        self.torch = torch
        self.spec, self.strict = spec, strict
        self.graphs: Counter = Counter()
        self._models: dict[int, object] = {}  # id(model), hidden -> its compiled module (or None: eager)
        self._chunk = None
        self._chunk_eager = False  # the chunk function failed to compile: eager from then on
        self._chunk_ok = False  # a compiled chunk has run
        # one entry per bucket for each model and grad mode; the decoder's forward is one
        # code object for a teacher and a student of one family
        need = 4 * bucket_count(max_length, spec) + 8
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), need))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * need)

    # ------------------------------------------------------------------ counting
    def _backend(self, name: str):
        def backend(gm, example_inputs):
            from torch._inductor.compile_fx import compile_fx

            self.graphs[name] += 1
            return compile_fx(gm, example_inputs)

        return backend

    def stats(self) -> dict[str, int]:
        return {"graphs": sum(self.graphs.values()), **{f"graphs/{k}": v for k, v in sorted(self.graphs.items())}}

    # ------------------------------------------------------------------ models
    def _compiled(self, model, hidden: bool):
        from hpd.backends.torch import family

        key = (id(model), hidden)
        if key not in self._models:
            name = "student" if any(p.requires_grad for p in model.parameters()) else "teacher"
            module = family.decoder_of(model) if hidden else model
            self._models[key] = self.torch.compile(module, backend=self._backend(name), dynamic=False)
        return self._models[key]

    def run(self, model, inputs: dict, hidden: bool):
        """The model's output (hidden states, or logits) on `inputs`, padded to the length's
        bucket for the compiled forward and cut back."""
        length = int(inputs["input_ids"].shape[1])
        padded = pad_to(inputs, bucket(length, self.spec))
        fn = self._compiled(model, hidden)
        if fn is None:
            return _eager(model, inputs, hidden)
        try:
            out = fn(**padded)
        except Exception as e:  # noqa: BLE001 - dynamo and inductor raise many kinds
            if self.strict:
                raise
            print(f"warning: torch.compile failed for this model ({type(e).__name__}: {str(e)[:200]}); "
                  "it runs uncompiled (--compile off hides this)", file=sys.stderr, flush=True)
            self._models[(id(model), hidden)] = None
            return _eager(model, inputs, hidden)
        x = out.last_hidden_state if hidden else out.logits
        return x if x.shape[1] == length else x[:, :length]

    # ------------------------------------------------------------------ the loss
    def chunk_fn(self):
        """hpd.objectives.chunked.chunk_terms compiled, with the normaliser applied outside."""
        if self._chunk is None:
            from hpd.objectives.chunked import chunk_terms

            compiled = self.torch.compile(chunk_terms, backend=self._backend("loss"), dynamic=True)

            def chunk(o, method, params, head, weight, h, y, s, u, lp, temperature, scale, vocab, want_hidden,
                      want_head, sorted_lp=None):
                args = (o, method, params, head, weight, h, y, s, u)
                rest = (temperature, 1.0, vocab, want_hidden, want_head)
                if self._chunk_eager:
                    value, diagnostics, domains, log_q_y, kl, gh, gw = chunk_terms(*args, lp, *rest,
                                                                                   sorted_lp=sorted_lp)
                else:
                    # until one compiled call has gone through, keep the teacher's rows: a failed
                    # compile must not lose them (one (C, V) array more, on the first chunk only)
                    kept = list(lp) if isinstance(lp, list) and not self._chunk_ok else lp
                    try:
                        value, diagnostics, domains, log_q_y, kl, gh, gw = compiled(*args, lp, *rest,
                                                                                    sorted_lp=sorted_lp)
                        self._chunk_ok = True
                    except Exception as e:  # noqa: BLE001 - dynamo and inductor raise many kinds
                        if self.strict or (isinstance(kept, list) and not kept):
                            raise
                        print(f"warning: torch.compile failed for the chunked loss ({type(e).__name__}: "
                              f"{str(e)[:200]}); it runs uncompiled (--compile off hides this)",
                              file=sys.stderr, flush=True)
                        self._chunk_eager = True
                        value, diagnostics, domains, log_q_y, kl, gh, gw = chunk_terms(*args, kept, *rest,
                                                                                       sorted_lp=sorted_lp)
                return (value, diagnostics, domains, log_q_y, kl, None if gh is None else gh * scale,
                        None if gw is None else gw * scale)

            self._chunk = chunk
        return self._chunk


def pad_to(inputs: dict, length: int) -> dict:
    """The model's keyword inputs with every (B, T) array padded at the end to `length`."""
    import torch

    have = int(inputs["input_ids"].shape[1])
    if have == length:
        return inputs
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "position_ids"):
        if key in inputs:
            x = inputs[key]
            out[key] = torch.cat([x, x.new_zeros((x.shape[0], length - have))], dim=1)
    return out


def _eager(model, inputs: dict, hidden: bool):
    from hpd.backends.torch import family

    return family.hidden_states(model, **inputs) if hidden else model(**inputs).logits


__all__ = ["Compiler", "bucket", "enabled", "pad_to"]
