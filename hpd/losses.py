"""`hpd.loss`: a method's loss and metrics from student logits, teacher logits and targets."""

from __future__ import annotations

from typing import Any

from hpd.objectives import TEMPERATURE, LOG_FLOOR, Method, Weights, get_method, resolve_params
from hpd.ops import ops_for


def loss(
    method: str,
    student_logits,
    teacher_logits,
    targets,
    *,
    sampled=None,
    ignore_index: int = -100,
    num_tokens: float | None = None,
    temperature: float = 1.0,
    **params: Any,
):
    """Reweighted log-likelihood loss of `method` and its metrics.

    student_logits, teacher_logits: (B, T, V) torch tensors or mlx arrays, where
    logits[..., t, :] scores targets[..., t]. targets: (B, T) integers; positions equal
    to `ignore_index` (or outside the shared vocabulary) do not count. sampled: (B, T)
    student samples for methods that use them (drawn here, without gradient, when None).
    num_tokens: divide by this count instead of the local count of active positions
    (the training loop passes the global count over accumulation steps and ranks).

    Returns (loss, metrics): a differentiable scalar and a dict of Python floats.
    """
    m = get_method(method)
    temperature = TEMPERATURE.check(method, "temperature", temperature)
    params = resolve_params(m, params)
    o = ops_for(student_logits)
    student_logits, teacher_logits, vocab = _shared_vocab(student_logits, teacher_logits, targets)
    mask, y = active_positions(o, targets, vocab, ignore_index)
    dtype = o.compute_dtype(student_logits)
    zs = o.astype(student_logits, dtype)
    zt = o.stop_gradient(o.astype(teacher_logits, dtype))
    if temperature != 1.0:
        zs, zt = zs / temperature, zt / temperature
    s = None
    if m.needs_sample:
        s = sample_tokens(o, zs) if sampled is None else _check_sampled(o, sampled, targets, vocab)
    per_pos, weights = objective_terms(o, m, zs, zt, y, s, params)
    count = o.count(mask)
    denom = float(num_tokens) if num_tokens is not None else max(count, 1.0)
    total = o.sum(o.where(mask, per_pos, 0.0 * per_pos))
    value = total / denom
    metrics = summarize(o, m, weights, o.take(o.stop_gradient(o.log_softmax(zs)), y), mask, count)
    return value, metrics


def objective_terms(o, m: Method, zs, zt, y, s, params) -> tuple[Any, Weights]:
    """Per-position objective (..., differentiable in zs) and the rule's weights.

    The value equals the rule's reported value (the literal divergence for the
    full-vocabulary methods); its gradient is -sum w * grad log q.
    """
    logq = o.maximum(o.log_softmax(zs), LOG_FLOOR)  # (..., V)
    lp = o.maximum(o.log_softmax(zt), LOG_FLOOR)
    lq = o.stop_gradient(logq)
    w = m.rule(o, lq, lp, y, s, **params)
    surrogate = None
    if w.full is not None:
        surrogate = -o.sum(o.stop_gradient(w.full) * logq, axis=-1)
    for idx, weight in w.sparse:
        term = -o.stop_gradient(weight) * o.take(logq, idx)
        surrogate = term if surrogate is None else surrogate + term
    per_pos = surrogate + o.stop_gradient(w.value - surrogate)
    return per_pos, w


def active_positions(o, targets, vocab: int, ignore_index: int):
    """(mask, safe targets): mask marks positions that count; ignored ones point at 0."""
    targets = o.int_array(targets)
    mask = (targets != ignore_index) & (targets >= 0) & (targets < vocab)
    return mask, o.where(mask, targets, 0 * targets)


def sample_tokens(o, logits, generator=None):
    """One token per position from softmax(logits), by Gumbel-max, without gradient."""
    z = o.stop_gradient(logits)
    return o.argmax(z + o.gumbel_like(z, generator))


def summarize(o, m: Method, w: Weights, lq_y, mask, count: float) -> dict[str, float]:
    """Means over active positions (and min/max for the k statistics) as Python floats."""
    n = max(count, 1.0)
    # Not 0.0 * lq_y: lq_y is -inf where an ignored position's placeholder token is a
    # masked (-inf) vocabulary entry, and 0 * -inf would turn every mean into NaN.
    zero = o.zeros_like(lq_y)

    def mean(x):
        return o.item(o.sum(o.where(mask, o.stop_gradient(x), zero))) / n

    metrics = {"tokens": count, "objective": mean(w.value), "nll": mean(-lq_y)}
    if m.full_vocab:
        metrics[m.name] = metrics["objective"]
    for name, x in w.diagnostics.items():
        x = o.stop_gradient(x)
        metrics[f"{m.name}/{name}"] = mean(x)
        if name.startswith("k_"):
            big = zero + 3.0e38
            if count > 0:
                metrics[f"{m.name}/{name}_min"] = o.item(o.min(o.where(mask, x, big)))
                metrics[f"{m.name}/{name}_max"] = o.item(o.max(o.where(mask, x, -big)))
            else:
                metrics[f"{m.name}/{name}_min"] = metrics[f"{m.name}/{name}_max"] = 0.0
    return metrics


def _shared_vocab(student_logits, teacher_logits, targets):
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    y_shape = tuple(targets.shape)
    if len(s_shape) < 2 or s_shape[:-1] != t_shape[:-1] or s_shape[:-1] != y_shape:
        raise ValueError(
            "shape mismatch: student logits "
            f"{s_shape}, teacher logits {t_shape}, targets {y_shape}; expected (..., V) logits "
            "with the same leading shape as the targets (vocabulary sizes may differ)"
        )
    vocab = min(s_shape[-1], t_shape[-1])
    if s_shape[-1] != vocab:
        student_logits = student_logits[..., :vocab]
    if t_shape[-1] != vocab:
        teacher_logits = teacher_logits[..., :vocab]
    return student_logits, teacher_logits, vocab


def _check_sampled(o, sampled, targets, vocab: int):
    if tuple(sampled.shape) != tuple(targets.shape):
        raise ValueError(
            f"sampled has shape {tuple(sampled.shape)}, targets {tuple(targets.shape)}; they must match"
        )
    sampled = o.int_array(sampled)
    lo, hi = o.item(o.min(sampled)), o.item(o.max(sampled))
    if lo < 0 or hi >= vocab:
        raise ValueError(f"sampled tokens must lie in [0, {vocab}); got values in [{lo:.0f}, {hi:.0f}]")
    return sampled
