"""Output heads as the chunked loss sees them: logits = softcap(scale * hidden @ W.T).

A model family's head is a plain matrix product followed, in some families, by a fixed
map of the logits: Cohere multiplies by `logit_scale`, Granite divides by
`logits_scaling`, Gemma 2 soft-caps with `softcap * tanh(z / softcap)`. The weight
may be dense (trainable, or frozen in a lower precision) or quantized (mlx affine
quantization: packed weight, scales and biases; always frozen).

`Head` describes one; `project` gives a chunk's logits and `pullback` carries a
gradient on those logits back to the hidden states (and to a dense weight). Both run
through the ops shim, so the same code serves torch and mlx. Because the scale is a
scalar, it is applied on the (C, H) side of the matmuls, never over (C, V).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Head:
    """An output projection: logits = softcap(scale * (hidden @ weight.T))."""

    weight: Any  # (V, H) dense, or (V, H * bits / 32) packed uint32 when quantized
    scales: Any = None  # quantized: (V, H / group_size)
    biases: Any = None
    group_size: int = 0
    bits: int = 0  # 0: dense
    scale: float = 1.0
    softcap: float = 0.0  # 0: off
    frozen: bool = False  # a dense weight that takes no gradient (a LoRA student's head): none is formed

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    @property
    def width(self) -> int:
        cols = int(self.weight.shape[-1])
        return cols * 32 // self.bits if self.quantized else cols

    @property
    def transformed(self) -> bool:
        return self.scale != 1.0 or self.softcap != 0.0

    def with_weight(self, weight) -> Head:
        return replace(self, weight=weight)

    def describe(self) -> str:
        parts = [f"{self.bits}-bit" if self.quantized else "dense"]
        if self.scale != 1.0:
            parts.append(f"logits x {self.scale:g}")
        if self.softcap:
            parts.append(f"soft-capped at {self.softcap:g}")
        return ", ".join(parts)


# A dense head stored in half precision (bfloat16 or float16): "auto" forms each chunk's
# logits straight from the half weight where the framework has a half product with
# float32 accumulation and float32 output (torch on CUDA: mm(..., out_dtype=float32)), the
# same numbers as the float32 product of the same half inputs up to summation order, with
# no float32 copy of the head (a 152k x 3584 teacher head: 2.2 GB a step). Elsewhere the
# head is cast to float32 once per loss, as before. "always" uses the half product
# wherever the framework has one, also where its output is rounded to the half dtype
# before the float32 log-softmax (torch on CPU: the logits carry bfloat16's 2^-8 relative
# rounding, ~1e-2 in the loss; tests/test_half_logits.py); "never" always casts.
HALF_LOGITS = "auto"


def half_logits(o, w, dtype=None) -> bool:
    """Whether logits (and the pullback) in `dtype` (float32 by default; never float64)
    use `w` as stored, in half precision."""
    if HALF_LOGITS == "never" or not hasattr(o, "half_matmul") or o.float_dtype(w) not in o.half_dtypes():
        return False
    if dtype is not None and dtype != o.compute_dtype(w):
        return False
    return HALF_LOGITS == "always" or o.exact_half_matmul(w)


# Config keys (the same in transformers and mlx-lm) that change the logits after the matmul.
def logit_transform(config) -> dict[str, float]:
    """Head(scale=..., softcap=...) of a model config (an object or a dict): Cohere's
    `logit_scale` multiplies, Granite's `logits_scaling` divides, Gemma 2's
    `final_logit_softcapping` soft-caps."""
    def get(key):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        return None if value in (None, 0, 0.0) else float(value)

    scale = 1.0
    if (v := get("logit_scale")) is not None:
        scale *= v
    if (v := get("logits_scaling")) is not None:
        scale /= v
    return {"scale": scale, "softcap": get("final_logit_softcapping") or 0.0}


def as_head(x) -> Head:
    """A `Head` as it is, or a bare (V, H) weight as a dense head."""
    return x if isinstance(x, Head) else Head(weight=x)


def project(o, head: Head, h, vocab: int, temperature: float = 1.0, *, dtype=None, weight=None):
    """Tempered logits (C, vocab) of hidden states h (C, H) in `dtype` (h's by default),
    and what `pullback` needs.

    `weight` overrides head.weight (a copy cast to `dtype`, made once per loss). The
    product is formed in `dtype` (float32 or float64), whatever the weight's storage
    (bfloat16 logits would put errors of ~1e-2 into the teacher's log-probs), except that
    a half-precision weight is used as stored where `half_logits` says so (a product with
    float32 accumulation and output).
    """
    w = head.weight if weight is None else weight
    dtype = o.float_dtype(h) if dtype is None else dtype
    factor = head.scale if head.softcap else head.scale / temperature
    x = h * factor if factor != 1.0 else h
    if head.quantized:
        z = o.quantized_matmul(x, head, transpose=True)
        if z.shape[-1] != vocab:
            z = z[:, :vocab]
    elif half_logits(o, w, dtype):  # float32 logits from the half weight as stored
        w = w[:vocab]
        z = o.half_matmul(x if o.float_dtype(x) == o.float_dtype(w) else o.astype(x, o.float_dtype(w)), w)
    else:
        w = w[:vocab]
        if o.float_dtype(x) != dtype:
            x = o.astype(x, dtype)
        if o.float_dtype(w) != dtype:
            w = o.astype(w, dtype)  # callers pass a weight cast once (`weight=`) to avoid this per chunk
        z = x @ w.T
    if o.float_dtype(z) != dtype:
        z = o.astype(z, dtype)
    tanh = None
    if head.softcap:
        tanh = o.tanh(z / head.softcap)
        z = tanh * (head.softcap / temperature)
    return z, tanh


def pullback(o, head: Head, g, h, tanh, temperature: float = 1.0, *, want_weight: bool, weight=None,
             extra_scale: float = 1.0):
    """(grad w.r.t. h (C, H), grad w.r.t. a dense weight (vocab, H) or None) from g (C, vocab),
    the gradient on the tempered logits that `project` returned. `extra_scale` multiplies
    both results (the loss normaliser), applied on the (C, H) side."""
    factor = head.scale / temperature * extra_scale
    if tanh is not None:
        g = g * (1.0 - tanh * tanh)  # d softcap*tanh(u/softcap) / du
    if head.quantized:
        full = head.vocab
        if g.shape[-1] != full:
            g = o.concat([g, o.zeros((g.shape[0], full - g.shape[-1]), o.float_dtype(g), g)], axis=1)
        grad_h = o.astype(o.quantized_matmul(g, head, transpose=False), o.float_dtype(h)) * factor
        return grad_h, None
    w = head.weight if weight is None else weight
    vocab = g.shape[-1]
    wv = w[:vocab]
    if half_logits(o, wv, o.float_dtype(g)):  # g in the head's dtype, float32 accumulation and result
        grad_h = o.half_matmul(o.astype(g, o.float_dtype(wv)), wv.T) * factor
        grad_w = g.T @ (h * factor) if want_weight else None
        return grad_h, grad_w
    if o.float_dtype(wv) != o.float_dtype(g):
        wv = o.astype(wv, o.float_dtype(g))
    grad_h = (g @ wv) * factor
    grad_w = g.T @ (h * factor) if want_weight else None
    return grad_h, grad_w


__all__ = ["Head", "as_head", "half_logits", "logit_transform", "project", "pullback", "HALF_LOGITS"]
