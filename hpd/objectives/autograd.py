"""A scalar loss whose gradients its own forward pass forms, handed to each framework's autodiff.

The chunked loss (`hpd.objectives.chunked`) computes its value and its gradients w.r.t.
the student's hidden states and head in one pass over the vocabulary. These bridges
make that pass a differentiable function for torch's autograd and mlx's transforms; the
ops shim picks the one of an array's framework (`ops.fused_loss`), so the math never
asks which backend it runs on. The loss is a terminal scalar, so its backward only
scales the formed gradients by the incoming cotangent.

`forward(hidden, head, want_hidden, want_head) -> (value, grad_hidden, grad_head, metrics)`:
`head` is a dense head weight that trains, or None (quantized or frozen); metrics are
Python floats, returned beside the value.
"""

from __future__ import annotations

from functools import cache


def torch_fused_loss(forward, hidden, head):
    """(loss, metrics): a torch scalar differentiable in `hidden` and a dense `head`."""
    import torch

    wants_head = head is not None and head.requires_grad
    if not (torch.is_grad_enabled() and (hidden.requires_grad or wants_head)):
        # no graph will be built, so skip the gradients (an evaluation pass costs half)
        value, _, _, metrics = forward(hidden, head, False, False)
        return value, metrics
    metrics: dict[str, float] = {}
    return _torch_function().apply(hidden, head, forward, metrics), metrics


@cache
def _torch_function():
    import torch
    from torch.autograd.function import once_differentiable

    class FusedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, head, forward, metrics_out):
            want_hidden, want_head = ctx.needs_input_grad[:2]
            # the loss computes in float32 (or float64); autocast would turn its matmuls to bf16
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                value, grad_hidden, grad_head, metrics = forward(hidden, head, want_hidden, want_head)
            metrics_out.update(metrics)
            ctx.dtypes = (hidden.dtype, None if head is None else head.dtype)
            ctx.save_for_backward(grad_hidden, grad_head)
            return value

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            grad_hidden, grad_head = ctx.saved_tensors
            hidden_dtype, head_dtype = ctx.dtypes
            if grad_hidden is not None:
                grad_hidden = (grad_hidden * grad_out).to(hidden_dtype)
            if grad_head is not None:
                grad_head = (grad_head * grad_out).to(head_dtype)
            return grad_hidden, grad_head, None, None

    return FusedLoss


def mlx_fused_loss(forward, hidden, head):
    """(loss, metrics): an mlx scalar differentiable in `hidden` and a dense `head`.

    mlx cannot tell a custom function whether a gradient will be asked for, so the
    forward always forms both gradients. The metrics are read (evaluated) in the
    forward, so this cannot run under mx.compile."""
    import mlx.core as mx

    metrics: dict[str, float] = {}

    # anything else the loss reads reaches it through `forward`, not as an argument:
    # those are constants, and custom_function outputs pass no gradient to them
    @mx.custom_function
    def fused(x, *weight):
        value, grad_hidden, grad_head, found = forward(untraced(x), untraced(weight[0]) if weight else None,
                                                       True, bool(weight))
        metrics.update(found)
        return (value, grad_hidden, grad_head) if weight else (value, grad_hidden)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        scale = cotangents[0]
        return tuple((g * scale).astype(p.dtype) for g, p in zip(outputs[1:], primals))

    args = (hidden,) if head is None else (hidden, head)
    return fused(*args)[0], metrics


def untraced(x):
    """A copy of mlx array `x` with no graph behind it.

    Under mx.grad every array computed from a differentiated input is a tracer, and mlx
    keeps a tracer's inputs alive after evaluating it. The chunk loop's accumulators
    would then hold every chunk's (chunk, V) intermediates until the end, which is the
    (B, T, V) footprint again. Arrays built from a fresh copy of the inputs are plain,
    and each chunk's intermediates are freed once the chunk is evaluated. The copy is
    hidden- or head-sized; gradients still reach `x` through the custom vjp.
    """
    import mlx.core as mx
    import numpy as np

    if x.dtype == mx.bfloat16:  # numpy has no bfloat16: copy the bits
        return untraced(x.view(mx.uint16)).view(mx.bfloat16)
    return mx.array(np.asarray(x), dtype=x.dtype)  # without dtype, float64 would become float32


__all__ = ["torch_fused_loss", "mlx_fused_loss", "untraced"]
