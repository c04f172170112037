"""mlx wrapper of the chunked loss: hpd.objectives.chunked computes the loss and its gradients in
one pass; this mx.custom_function hands them to autodiff (mirrors backends/torch/chunked.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from hpd.objectives.chunked import ChunkPlan, forward_and_grads
from hpd.objectives.ops import ops_for


def chunked_loss(plan: ChunkPlan, student_hidden: mx.array, student_head: mx.array | None):
    """(loss, metrics) of `plan`, differentiable in student_hidden (N, H) and a dense
    student_head (None for a quantized, frozen head).

    mlx cannot tell a custom function whether a gradient will be asked for, so the
    forward always forms both gradients. The metrics are read (evaluated) in the
    forward, as in hpd.loss, so this cannot run under mx.compile.
    """
    o = ops_for(student_hidden)
    metrics: dict[str, float] = {}

    # The teacher, targets and samples reach the function through `plan`, not as its
    # arguments: they are constants, and custom_function outputs pass no gradient to them.
    @mx.custom_function
    def fused(hidden, *head):
        weight = untraced(head[0]) if head else None
        value, grad_hidden, grad_head, found = forward_and_grads(o, plan, untraced(hidden), weight,
                                                                 want_head=bool(head))
        metrics.update(found)
        return (value, grad_hidden, grad_head) if head else (value, grad_hidden)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        # The loss is a terminal scalar: its backward scales the gradients formed in forward.
        scale = cotangents[0]
        grads = [(g * scale).astype(p.dtype) for g, p in zip(outputs[1:], primals)]
        return tuple(grads)

    args = (student_hidden,) if student_head is None else (student_hidden, student_head)
    value = fused(*args)[0]
    return value, metrics


def untraced(x: mx.array) -> mx.array:
    """A copy of `x` with no graph behind it.

    Under mx.grad every array computed from a differentiated input is a tracer, and mlx
    keeps a tracer's inputs alive after evaluating it. The chunk loop's accumulators
    would then hold every chunk's (chunk, V) intermediates until the end, which is the
    (B, T, V) footprint again. Arrays built from a fresh copy of the inputs are plain,
    and each chunk's intermediates are freed once the chunk is evaluated. The copy is
    hidden- and head-sized; gradients still reach `x` through the custom vjp.
    """
    if x.dtype == mx.bfloat16:  # numpy has no bfloat16: copy the bits
        return untraced(x.view(mx.uint16)).view(mx.bfloat16)
    return mx.array(np.asarray(x), dtype=x.dtype)  # without dtype, float64 would become float32


__all__ = ["chunked_loss"]
