"""torch wrapper of the chunked loss: hpd.objectives.chunked computes the loss and its gradients in
one pass; this autograd.Function hands them to autograd (mirrors backends/mlx/chunked.py)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from hpd.backends.torch import compiled
from hpd.objectives.chunked import ChunkPlan, forward_and_grads
from hpd.objectives.ops import ops_for


def chunked_loss(plan: ChunkPlan, student_hidden: torch.Tensor, student_head: torch.Tensor | None):
    """(loss, metrics) of `plan`, differentiable in student_hidden (N, H) and a dense
    student_head (None for a quantized, frozen head)."""
    o = ops_for(student_hidden)
    head_grad = student_head is not None and student_head.requires_grad
    wanted = torch.is_grad_enabled() and (student_hidden.requires_grad or head_grad)
    if not wanted:
        # No graph will be built, so skip the gradients (an evaluation pass costs half).
        value, _, _, metrics = forward_and_grads(
            o, plan, student_hidden, student_head, want_hidden=False, want_head=False, chunk_fn=compiled.chunk_fn()
        )
        return value, metrics
    metrics: dict[str, float] = {}
    value = _FusedChunkedLoss.apply(student_hidden, student_head, plan, metrics)
    return value, metrics


class _FusedChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_head, plan, metrics_out):
        o = ops_for(student_hidden)
        want_hidden, want_head = ctx.needs_input_grad[:2]
        # The core computes in float32 (or float64); autocast would turn its matmuls to bf16.
        with torch.autocast(device_type=student_hidden.device.type, enabled=False):
            value, grad_hidden, grad_head, metrics = forward_and_grads(
                o, plan, student_hidden, student_head, want_hidden=want_hidden, want_head=want_head,
                chunk_fn=compiled.chunk_fn()  # None unless --compile is on (backends/torch/compiled.py)
            )
        metrics_out.update(metrics)
        ctx.dtypes = (student_hidden.dtype, None if student_head is None else student_head.dtype)
        ctx.save_for_backward(grad_hidden, grad_head)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # The loss is a terminal scalar: its backward scales the gradients formed in forward.
        grad_hidden, grad_head = ctx.saved_tensors
        hidden_dtype, head_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_out).to(hidden_dtype)
        if grad_head is not None:
            grad_head = (grad_head * grad_out).to(head_dtype)
        return grad_hidden, grad_head, None, None


__all__ = ["chunked_loss"]
