"""`hpd.chunked_loss`: `hpd.loss` from hidden states and output heads, never holding (B, T, V).

The plain path needs the student's and the teacher's logits for every position at once;
at a 152k vocabulary, 4k tokens and 8 sequences that is 20 GB per tensor in float32.
Here the positions are flattened and taken `chunk_size` at a time: each chunk's logits
are computed from the hidden states and the heads, the method's rule runs on them, and
the chunk's gradient is formed in closed form and pushed straight through the head
matmul, so only (chunk, V) arrays ever exist.

Every rule's gradient w.r.t. the student's log-probs is -sum w * grad log q, so w.r.t.
the logits z (at temperature T, the rule sees z / T) it is, per active position,

    dL/dz = (q * (sum_v full_v + sum_i w_i) - full - scatter(w_i at idx_i)) / (T * N)

with N the normaliser. The chunk then contributes g @ head to the hidden states'
gradient and g.T @ hidden to the head's.

Fused forward, not recompute: the loss is a terminal scalar, so its backward only scales
these gradients by the incoming cotangent. Forming them in the forward pass costs one
pass over the vocabulary; recomputing in backward would pay both logit matmuls and both
softmaxes a second time. What the forward keeps for backward is one hidden-sized and one
head-sized array, both far smaller than the logits. The cost is that a forward without a
backward (evaluation) still forms the gradients unless the wrapper says they are not
wanted: the torch wrapper knows (needs_input_grad, grad mode), mlx's custom_function
cannot, so there evaluation should call `hpd.loss` on small batches or accept the cost.

The framework wrappers (`hpd.backends.<name>.chunked`) hand these gradients to autograd;
this module imports neither torch nor mlx.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from hpd.losses import MetricTally, _check_sampled, active_positions, sample_tokens, token_kl
from hpd.objectives import TEMPERATURE, LOG_FLOOR, Method, get_method, resolve_params
from hpd.ops import ops_for



@dataclass(frozen=True)
class ChunkPlan:
    """Everything about one chunked loss except the student's differentiable inputs."""

    method: Method
    params: dict[str, float]
    temperature: float
    chunk_size: int
    vocab: int  # shared prefix of the two vocabularies
    teacher_hidden: Any  # (N, H_t), constant
    teacher_head: Any  # (vocab, H_t), constant
    targets: Any  # (N,) ignored positions point at 0
    mask: Any  # (N,) positions that count
    sampled: Any  # (N,) student samples, or None: drawn per chunk when the method needs them
    count: float  # active positions here
    denom: float  # what the summed objective is divided by


def chunked_loss(
    method: str,
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    targets,
    *,
    sampled=None,
    ignore_index: int = -100,
    num_tokens: float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    **params: Any,
):
    """`hpd.loss` of `method`, computed `chunk_size` positions at a time.

    student_hidden (B, T, H_s), teacher_hidden (B, T, H_t): final (post-norm) hidden
    states, where hidden[..., t, :] scores targets[..., t]. student_head (V_s, H_s),
    teacher_head (V_t, H_t): output-projection weights (logits = hidden @ head.T); the
    vocabularies are cut to their shared prefix. Gradients reach student_hidden and
    student_head (whatever tensor is passed, so a tied embedding gets them); the teacher
    is constant. The other arguments, the returned loss and the metrics are as in
    `hpd.loss`. Computes in float32 (float64 when student_hidden is float64).
    """
    m = get_method(method)
    temperature = TEMPERATURE.check(method, "temperature", temperature)
    params = resolve_params(m, params)
    chunk_size = _check_chunk_size(chunk_size)
    o = ops_for(student_hidden)
    others = {"student_head": student_head, "teacher_hidden": teacher_hidden, "teacher_head": teacher_head}
    for name, x in others.items():
        if ops_for(x).name != o.name:
            raise TypeError(
                f"{name} is a {ops_for(x).name} array but student_hidden is a {o.name} one; "
                "pass all four from one framework"
            )
    vocab = _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head, targets)
    mask, y = active_positions(o, targets, vocab, ignore_index)
    s = None
    if m.needs_sample and sampled is not None:
        s = _check_sampled(o, sampled, targets, vocab).reshape((-1,))
    count = o.count(mask)
    plan = ChunkPlan(
        method=m,
        params=params,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab=vocab,
        teacher_hidden=o.stop_gradient(teacher_hidden).reshape((-1, teacher_hidden.shape[-1])),
        teacher_head=o.stop_gradient(teacher_head)[:vocab],
        targets=y.reshape((-1,)),
        mask=mask.reshape((-1,)),
        sampled=s,
        count=count,
        denom=float(num_tokens) if num_tokens is not None else max(count, 1.0),
    )
    backend = importlib.import_module(f"hpd.backends.{o.name}.chunked")
    return backend.chunked_loss(plan, student_hidden, student_head)


def forward_and_grads(o, plan: ChunkPlan, student_hidden, student_head, *, want_hidden=True, want_head=True):
    """(loss, grad w.r.t. student_hidden, grad w.r.t. student_head, metrics), chunk by chunk.

    The gradients are those of the returned loss, in the compute dtype and shaped like
    the inputs (None when not wanted); the framework wrappers hand them to autograd.
    """
    with o.no_grad():
        dtype = o.compute_dtype(student_hidden)
        n, width = plan.targets.shape[0], student_hidden.shape[-1]
        hidden = o.stop_gradient(student_hidden).reshape((n, width))
        # Heads are cast once, not per chunk: a head-sized copy, like the head's gradient.
        head_s = o.astype(o.stop_gradient(student_head)[: plan.vocab], dtype)  # (V, H_s)
        head_t = o.astype(plan.teacher_head, dtype)  # (V, H_t)
        scale = 1.0 / (plan.temperature * plan.denom)
        total = o.zeros((), dtype, hidden)
        tally = MetricTally(o, plan.method, dtype, hidden)
        grad_hidden = []
        grad_head = o.zeros((plan.vocab, width), dtype, hidden) if want_head else None
        for start in range(0, n, plan.chunk_size):
            rows = slice(start, min(start + plan.chunk_size, n))
            h = o.astype(hidden[rows], dtype)  # (C, H_s)
            zs = h @ head_s.T  # (C, V)
            zt = o.astype(plan.teacher_hidden[rows], dtype) @ head_t.T
            if plan.temperature != 1.0:
                zs, zt = zs / plan.temperature, zt / plan.temperature
            y, mask = plan.targets[rows], plan.mask[rows]
            s = None
            if plan.method.needs_sample:
                s = sample_tokens(o, zs) if plan.sampled is None else plan.sampled[rows]
            log_q = o.log_softmax(zs)
            lq = o.maximum(log_q, LOG_FLOOR)
            lp = o.maximum(o.log_softmax(zt), LOG_FLOOR)
            del zs, zt  # (C, V) each, not needed past here: kept out of the chunk's peak
            w = plan.method.rule(o, lq, lp, y, s, **plan.params)
            total = total + o.sum(o.where(mask, w.value, o.zeros_like(w.value)))
            tally.add(w, o.take(log_q, y), mask, token_kl(o, plan.method, w, lq, lp))
            pending = [total, *tally.arrays()]
            if want_hidden or want_head:
                g = logit_grad(o, w, log_q, mask)  # (C, V): inactive rows zero, not yet scaled
                # The scale goes on the (C, H) side of each matmul, not over (C, V).
                if want_hidden:
                    grad_hidden.append((g @ head_s) * scale)  # (C, H_s)
                    pending.append(grad_hidden[-1])
                if want_head:
                    grad_head = grad_head + g.T @ (h * scale)
                    pending.append(grad_head)
            o.evaluate(*pending)
        if want_hidden:
            grad_hidden = o.concat(grad_hidden, axis=0).reshape(tuple(student_hidden.shape))
        else:
            grad_hidden = None
        if want_head and student_head.shape[0] > plan.vocab:
            rest = o.zeros((student_head.shape[0] - plan.vocab, width), dtype, hidden)
            grad_head = o.concat([grad_head, rest], axis=0)
        return total / plan.denom, grad_hidden, grad_head, tally.metrics(plan.count)


def logit_grad(o, w, log_q, mask=None):
    """d/dz of -sum_v w_v log q_v per position, from the rule's weights: (C, V).

    Rows where `mask` (C,) is False get a zero gradient. Below LOG_FLOOR the plain path's
    floor passes no gradient; the weights there are dropped to match (q is 0 there in
    any float format, so only -inf logits notice). Sparse weights are masked and summed
    as (C,) arrays, so the (C, V) work is one `where` for a full-vocabulary rule, one
    `put` per sparse term, and q * row_sum - weights (on CPU each fresh (C, V) array
    also costs page faults, so every pass saved counts twice).
    """
    weights, row_sum = None, None
    if w.full is not None:
        keep = log_q > LOG_FLOOR
        if mask is not None:
            keep = keep & mask[:, None]
        weights = o.where(keep, w.full, 0.0)
        row_sum = o.sum(weights, axis=-1)
    for idx, value in w.sparse:
        keep = o.take(log_q, idx) > LOG_FLOOR
        if mask is not None:
            keep = keep & mask
        value = o.where(keep, value, 0.0)  # (C,)
        placed = o.put(log_q, idx, value)
        weights = placed if weights is None else weights + placed
        row_sum = value if row_sum is None else row_sum + value
    return o.exp(log_q) * row_sum[:, None] - weights


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (positions per chunk); got {chunk_size!r}")
    return chunk_size


def _check_shapes(student_hidden, student_head, teacher_hidden, teacher_head, targets) -> int:
    """The shared vocabulary size, after checking that the shapes fit together."""
    sh, th, y = tuple(student_hidden.shape), tuple(teacher_hidden.shape), tuple(targets.shape)
    if len(sh) < 2 or sh[:-1] != y or th[:-1] != y:
        raise ValueError(
            f"shape mismatch: student hidden {sh}, teacher hidden {th}, targets {y}; expected "
            "(..., H) hidden states with the same leading shape as the targets (widths may differ)"
        )
    for side, hidden, head in [("student", sh, student_head), ("teacher", th, teacher_head)]:
        head = tuple(head.shape)
        if len(head) != 2 or head[1] != hidden[-1]:
            raise ValueError(
                f"{side} head has shape {head}; expected (V, {hidden[-1]}) to match the {side} "
                f"hidden width (logits = hidden @ head.T)"
            )
    return min(student_head.shape[0], teacher_head.shape[0])


__all__ = ["chunked_loss", "forward_and_grads", "logit_grad", "ChunkPlan"]
