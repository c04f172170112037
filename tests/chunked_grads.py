"""The chunked loss and its gradients with respect to the student's hidden states and head, on
torch or mlx, as numpy arrays: what the store tests and benchmarks.store_vs_live compare
between a live teacher and a stored one."""

from __future__ import annotations

import numpy as np

import hpd


def loss_and_grads(backend_name: str, method: str, hidden, head, targets, teacher, sampled, **options):
    """(loss, d loss / d hidden, d loss / d head) of `hpd.chunked_loss(method, ...)` against the
    teacher source `teacher`; `options` go to the loss (chunk_size, method parameters)."""
    kw = dict(targets=targets, teacher=teacher, sampled=sampled, **options)
    if backend_name == "torch":
        h = hidden.detach().clone().requires_grad_(True)
        w = head.detach().clone().requires_grad_(True)
        value, _ = hpd.chunked_loss(method, h, w, **kw)
        value.backward()
        return float(value.detach()), h.grad.numpy(), w.grad.numpy()
    import mlx.core as mx

    def loss(h, w):
        return hpd.chunked_loss(method, h, w, **kw)[0]

    value, (gh, gw) = mx.value_and_grad(loss, argnums=(0, 1))(hidden, head)
    return float(value), np.array(gh), np.array(gw)
