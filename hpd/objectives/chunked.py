"""`hpd.chunked_loss`: `hpd.loss` from hidden states and output heads, never holding (B, T, V).

The plain path needs the student's and the teacher's logits for every position at once;
at a 152k vocabulary, 4k tokens and 8 sequences that is 20 GB per tensor in float32.
Here only the positions whose target counts are gathered (prompt and padding never
reach the vocabulary), and they are taken a chunk at a time, the chunk sized from a
byte budget: each chunk's student logits come from the hidden states and the student's
`Head` (dense, tied, quantized, scaled or soft-capped), the teacher's log-probs from a
`TeacherSource` (the live teacher's head, or an offline store), the method's rule runs
on them, and the chunk's gradient is formed in closed form and pushed back through the
head, so only (chunk, V) arrays ever exist.

Every rule's gradient w.r.t. the student's log-probs is -sum w * grad log q, so w.r.t.
the logits z (at temperature T, the rule sees z / T) it is, per active position,

    dL/dz = (q * (sum_v full_v + sum_i w_i) - full - scatter(w_i at idx_i)) / (T * N)

with N the normaliser. The chunk then contributes g @ head to the hidden states'
gradient and g.T @ hidden to the head's (through the soft-cap's tanh, where there is
one; `hpd.objectives.heads.pullback`).

Fused forward, not recompute: the loss is a terminal scalar, so its backward only scales
these gradients by the incoming cotangent. Forming them in the forward pass costs one
pass over the vocabulary; recomputing in backward would pay both logit matmuls and both
softmaxes a second time. What the forward keeps for backward is one hidden-sized and one
head-sized array, both far smaller than the logits. The cost is that a forward without a
backward (evaluation) still forms the gradients unless the wrapper says they are not
wanted: the torch wrapper knows (needs_input_grad, grad mode), mlx's custom_function
cannot, so there evaluation should call `hpd.loss` on small batches or accept the cost.

The ops shim hands these gradients to the array's framework (`ops.fused_loss`,
hpd.objectives.autograd); this module imports neither torch nor mlx.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from hpd.objectives.heads import Head, as_head, half_logits, project, pullback
from hpd.objectives.losses import MetricTally, Supervised, student_sample, supervised, token_kl
from hpd.objectives.ops import ops_for
from hpd.objectives.rules import LOG_FLOOR, Method, Weights
from hpd.objectives.teacher import LiveTeacher, TeacherSource, sorted_log_probs

# What one chunk holds at its peak, in (chunk, V) arrays of the compute dtype, counted
# from the loop below: the student's log-probs (and floored copy), the teacher's
# log-probs, the rule's weights and the logit gradient with its temporaries.
CHUNK_BUFFERS = 6
# 64 MiB keeps each (chunk, V) float32 buffer under glibc's 32 MiB mmap ceiling, so on CPU
# the buffers are reused from the heap rather than mapped afresh every chunk
# (benchmarks/results/ has the measurements).
DEFAULT_CHUNK_BUDGET_MB = 64
# On CUDA a 64 MiB chunk is ~85 positions at a 32k vocabulary, and the step waits on the
# launches of many small kernels; a GiB per chunk is ~1400 positions there
# (benchmarks/results/gpu, benchmarks/gpu_check.sh).
ACCELERATOR_CHUNK_BUDGET_MB = 1024


def resolve_chunk_budget(budget_mb: float, accelerator: bool) -> float:
    """--chunk-budget-mb: as given, or (0, the default) 64 MiB, and 1 GiB on an accelerator
    whose kernels are small enough to make launches the cost (torch on CUDA)."""
    if budget_mb and budget_mb > 0:
        return float(budget_mb)
    return float(ACCELERATOR_CHUNK_BUDGET_MB if accelerator else DEFAULT_CHUNK_BUDGET_MB)


@dataclass(frozen=True)
class ChunkPlan:
    """Everything about one chunked loss except the student's differentiable inputs: the
    supervised positions (`hpd.objectives.losses.Supervised`), the teacher selected to
    them, the student's head and the chunking."""

    supervised: Supervised
    chunk_size: int
    teacher: TeacherSource  # selected to the active positions, constant
    student_head: Head  # its weight is replaced by the wrapper's differentiable input
    # one chunk's vocabulary-sized work: chunk_terms, or a backend's compiled version of it
    chunk_fn: Any = None


def chunked_loss(
    method: str,
    student_hidden,
    student_head,
    teacher_hidden=None,
    teacher_head=None,
    targets=None,
    *,
    teacher: TeacherSource | None = None,
    sampled=None,
    uniforms=None,
    ignore_index: int = -100,
    num_tokens: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | str = "auto",
    chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB,
    chunk_fn=None,
    groups=None,
    **params: Any,
):
    """`hpd.loss` of `method`, computed a chunk of supervised positions at a time.

    student_hidden (B, T, H_s): final (post-norm) hidden states, where hidden[..., t, :]
    scores targets[..., t]. student_head: the output projection, a `hpd.objectives.heads.Head` or a
    bare (V_s, H_s) weight (logits = hidden @ head.T). The teacher is either
    teacher_hidden (B, T, H_t) with teacher_head, or `teacher=`, any `TeacherSource`
    (an offline store, say). The vocabularies are cut to their shared prefix.

    Only positions whose target counts are gathered, before any vocabulary-sized work.
    chunk_size: positions per chunk, or "auto" to size chunks so that one chunk's
    (chunk, V) buffers stay within chunk_budget_mb. uniforms (B, T) in [0, 1): draw the
    student sample of methods that need one by inverse CDF with these instead of the
    framework's RNG. Gradients reach student_hidden and a dense student head (whatever
    tensor is passed, so a tied embedding gets them); a quantized head and the teacher
    are constant. chunk_fn: a stand-in for `chunk_terms` with its signature (a backend's
    compiled version). The other arguments, the returned loss and the metrics are as in
    `hpd.loss`. Computes in float32 (float64 when student_hidden is float64).
    """
    o = ops_for(student_hidden)
    head = as_head(student_head)
    if teacher is None:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("chunked_loss needs teacher_hidden and teacher_head, or teacher=")
        _check_teacher_shapes(teacher_hidden, as_head(teacher_head), targets)
        teacher = LiveTeacher(teacher_hidden, teacher_head)
    _check_frameworks(o, teacher, head, targets)
    vocab = _check_shapes(student_hidden, head, targets, teacher.vocab)
    sup = supervised(method, o, targets, vocab, like=student_hidden, sampled=sampled, uniforms=uniforms,
                     ignore_index=ignore_index, num_tokens=num_tokens, temperature=temperature, params=params,
                     groups=groups)
    plan = ChunkPlan(
        supervised=sup,
        # a source whose rows pass through a wider vocabulary of its own (a teacher of another
        # tokenizer: `width`) sizes the chunks by it, so one chunk stays within the budget
        chunk_size=resolve_chunk_size(chunk_size, max(vocab, int(getattr(teacher, "width", 0))),
                                      o.itemsize(o.compute_dtype(student_hidden)), chunk_budget_mb),
        teacher=teacher.select(o, sup.index),
        student_head=head,
        chunk_fn=chunk_fn,
    )
    width = student_hidden.shape[-1]
    hidden = o.rows(student_hidden.reshape((-1, width)), sup.index)  # (N, H_s), differentiable
    weight = None if head.quantized or head.frozen else head.weight
    return o.fused_loss(partial(_forward_and_grads, o, plan), hidden, weight)


def _forward_and_grads(o, plan, hidden, head_weight, want_hidden, want_head):
    return forward_and_grads(o, plan, hidden, head_weight, want_hidden=want_hidden, want_head=want_head)


def _check_frameworks(o, teacher, head: Head, targets) -> None:
    arrays = {"student_head": head.weight, "targets": targets}
    if isinstance(teacher, LiveTeacher):
        arrays.update(teacher_hidden=teacher.hidden, teacher_head=teacher.head.weight)
    for name, x in arrays.items():
        if ops_for(x).name != o.name:
            raise TypeError(
                f"{name} is a {ops_for(x).name} array but student_hidden is a {o.name} one; "
                "pass every array from one framework"
            )


def forward_and_grads(o, plan: ChunkPlan, hidden, head_weight, *, want_hidden=True, want_head=True):
    """(loss, grad w.r.t. hidden (N, H), grad w.r.t. the dense head weight, metrics).

    `hidden` holds the active positions only. The gradients are those of the returned
    loss, in the compute dtype (None when not wanted, and for a quantized head's
    weight); `ops.fused_loss` hands them to autodiff.
    """
    sup = plan.supervised
    with o.no_grad():
        dtype = o.compute_dtype(hidden)
        n, width = hidden.shape[0], hidden.shape[-1]
        hidden = o.stop_gradient(hidden)
        head, weight = _head_for_chunks(o, plan.student_head, head_weight, sup.vocab, dtype)
        want_head = want_head and not head.quantized and head_weight is not None
        total = o.zeros((), dtype, hidden)
        tally = MetricTally(o, sup.method, dtype, hidden, sup.group_count)
        grad_hidden = []
        grad_head = o.zeros((sup.vocab, width), dtype, hidden) if want_head else None
        chunk = plan.chunk_fn or chunk_terms
        for start in range(0, n, plan.chunk_size):
            rows = slice(start, min(start + plan.chunk_size, n))
            lp = plan.teacher.log_probs(o, rows, sup.vocab, sup.temperature, dtype)  # (C, V)
            sorted_lp = (sorted_log_probs(o, plan.teacher, rows, sup.vocab, sup.temperature, dtype, lp)
                         if sup.method.sorted_teacher else None)
            lp = [lp]  # handed over: see chunk_terms
            value, diagnostics, domains, log_q_y, kl, gh, gw = chunk(
                o, sup.method, sup.params, head, weight, o.astype(hidden[rows], dtype), sup.targets[rows],
                _part(sup.sampled, rows), _part(sup.uniforms, rows), lp, sup.temperature, 1.0 / sup.denom,
                sup.vocab, want_hidden, want_head, sorted_lp=sorted_lp)
            del sorted_lp
            total = total + o.sum(value)
            tally.add(Weights(value=value, diagnostics=diagnostics, domains=domains), log_q_y, None, kl,
                      groups=_part(sup.groups, rows))
            pending = [total, *tally.arrays()]
            if want_hidden:
                grad_hidden.append(gh)  # (C, H_s)
                pending.append(gh)
            if want_head:
                grad_head = grad_head + gw
                pending.append(grad_head)
            o.evaluate(*pending)
        if want_hidden:
            grad_hidden = o.concat(grad_hidden, axis=0) if grad_hidden else o.zeros((0, width), dtype, hidden)
        else:
            grad_hidden = None
        if want_head and head.vocab > sup.vocab:
            rest = o.zeros((head.vocab - sup.vocab, width), dtype, hidden)
            grad_head = o.concat([grad_head, rest], axis=0)
        return total / sup.denom, grad_hidden, grad_head, tally.metrics(sup.count)


def _head_for_chunks(o, head: Head, head_weight, vocab: int, dtype):
    """(the head with its differentiable weight in place, its weight over the shared
    vocabulary in the compute dtype, or None for a quantized head). Cast once, not per
    chunk: a head-sized copy, like the head's gradient (none for a half-precision head
    that forms float32 logits as stored: hpd.objectives.heads.half_logits)."""
    if head.quantized:
        return head, None
    if head_weight is not None:  # else frozen: the head's own weight, no gradient
        head = head.with_weight(head_weight)
    weight = o.stop_gradient(head.weight)[:vocab]  # (V, H_s)
    return head, weight if half_logits(o, weight, dtype) else o.astype(weight, dtype)


def _part(x, rows: slice):
    return None if x is None else x[rows]


def chunk_terms(o, method: Method, params: dict, head: Head, weight, h, y, s, u, lp, temperature: float,
                scale: float, vocab: int, want_hidden: bool, want_head: bool, sorted_lp=None):
    """One chunk's vocabulary-sized work, from the student's hidden states h (C, H) and the
    teacher's log-probs (C, V): the student's logits and log-probs, the rule, the token KL
    and the gradients pushed back through the head. Returns (the objective per position,
    the rule's diagnostics and domains, log q(y), the token KL, grad w.r.t. h or None,
    grad w.r.t. the head or None). Arrays and plain values in, arrays out, so a backend
    can run it compiled (hpd.backends.torch.compiled).

    lp: the teacher's log-probs, or a one-item list of them that is emptied here, so that
    they are freed once the rule has used them (the caller keeps no reference: one (C, V)
    array fewer at the chunk's peak). sorted_lp: the teacher's log-probs sorted in descending
    order, for a rule that compares sorted distributions (uld)."""
    if isinstance(lp, list):
        lp = lp.pop()
    dtype = o.float_dtype(h)
    zs, tanh = project(o, head, h, vocab, temperature, dtype=dtype, weight=weight)  # (C, V)
    log_q = o.log_softmax(zs)
    s = student_sample(o, method, zs, s, u, log_probs=log_q)
    del zs  # (C, V), not needed past here: kept out of the chunk's peak
    lq = o.maximum(log_q, LOG_FLOOR)
    lp = o.maximum(lp, LOG_FLOOR)
    extra = {} if sorted_lp is None else {"sorted_lp": o.maximum(sorted_lp, LOG_FLOOR)}
    w = method.rule(o, lq, lp, y, s, **extra, **params)
    kl = token_kl(o, method, w, lq, lp)
    del lp, lq, extra
    gh = gw = None
    if want_hidden or want_head:
        g = logit_grad(o, w, log_q)  # (C, V), not yet scaled
        gh, gw = pullback(o, head, g, h, tanh, temperature, want_weight=want_head, weight=weight,
                          extra_scale=scale)
    return w.value, w.diagnostics, w.domains, o.take(log_q, y), kl, gh, gw


def resolve_chunk_size(chunk_size: int | str, vocab: int, itemsize: int = 4,
                       budget_mb: float = DEFAULT_CHUNK_BUDGET_MB) -> int:
    """Positions per chunk: as given, or ("auto") as many as keep one chunk's
    CHUNK_BUFFERS (chunk, vocab) arrays within budget_mb (at least 16)."""
    if chunk_size == "auto":
        if not budget_mb or budget_mb <= 0:
            raise ValueError(f"chunk_budget_mb must be positive; got {budget_mb!r}")
        per_position = CHUNK_BUFFERS * max(vocab, 1) * itemsize
        return max(16, int(budget_mb * 2**20 // per_position))
    if isinstance(chunk_size, str) and chunk_size.strip().isdigit():
        chunk_size = int(chunk_size)
    return _check_chunk_size(chunk_size)


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
        raise ValueError(f"chunk_size must be a positive integer (positions per chunk) or 'auto'; "
                         f"got {chunk_size!r}")
    return chunk_size


def _check_shapes(student_hidden, head: Head, targets, teacher_vocab: int) -> int:
    """The shared vocabulary size, after checking that the student's shapes fit together."""
    _check_side("student", student_hidden, head, targets)
    return min(head.vocab, teacher_vocab)


def _check_teacher_shapes(teacher_hidden, head: Head, targets) -> None:
    _check_side("teacher", teacher_hidden, head, targets)


def _check_side(side: str, hidden, head: Head, targets) -> None:
    h, y = tuple(hidden.shape), tuple(targets.shape)
    if len(h) < 2 or h[:-1] != y:
        raise ValueError(
            f"shape mismatch: {side} hidden {h}, targets {y}; expected (..., H) hidden states "
            "with the same leading shape as the targets (the two models' widths may differ)"
        )
    if len(head.weight.shape) != 2 or head.width != h[-1]:
        raise ValueError(
            f"{side} head has shape {tuple(head.weight.shape)}; expected (V, {h[-1]}) to match the "
            f"{side} hidden width (logits = hidden @ head.T)"
        )


__all__ = ["chunked_loss", "forward_and_grads", "chunk_terms", "logit_grad", "resolve_chunk_size", "ChunkPlan"]
