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
    per_pos, weights, log_q_y, kl = objective_terms(o, m, zs, zt, y, s, params)
    count = o.count(mask)
    denom = float(num_tokens) if num_tokens is not None else max(count, 1.0)
    total = o.sum(o.where(mask, per_pos, 0.0 * per_pos))
    value = total / denom
    metrics = summarize(o, m, weights, log_q_y, mask, count, kl)
    return value, metrics


def token_kl(o, m: Method, w: Weights, lq, lp):
    """KL(teacher || student) per position, from log-probs the step already holds.

    It is what to watch when a method's loss value is a surrogate (hpd, sft): comparable
    across methods and runs. fkl's value is this KL already."""
    return w.value if m.name == "fkl" else o.sum(o.exp(lp) * (lp - lq), axis=-1)


def objective_terms(o, m: Method, zs, zt, y, s, params) -> tuple[Any, Weights, Any]:
    """Per-position objective (..., differentiable in zs), the rule's weights, the
    student's log-prob of y (unfloored, without gradient) and the token-level KL to the
    teacher, both for the metrics.

    The value equals the rule's reported value (the literal divergence for the
    full-vocabulary methods); its gradient is -sum w * grad log q.
    """
    log_q = o.log_softmax(zs)  # (..., V)
    logq = o.maximum(log_q, LOG_FLOOR)
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
    return per_pos, w, o.take(o.stop_gradient(log_q), y), token_kl(o, m, w, lq, lp)


def active_positions(o, targets, vocab: int, ignore_index: int):
    """(mask, safe targets): mask marks positions that count; ignored ones point at 0."""
    targets = o.int_array(targets)
    mask = (targets != ignore_index) & (targets >= 0) & (targets < vocab)
    return mask, o.where(mask, targets, 0 * targets)


def sample_tokens(o, logits, generator=None):
    """One token per position from softmax(logits), by Gumbel-max, without gradient."""
    z = o.stop_gradient(logits)
    return o.argmax(z + o.gumbel_like(z, generator))


def summarize(o, m: Method, w: Weights, lq_y, mask, count: float, kl=None) -> dict[str, float]:
    """Means over active positions (and min/max for the k statistics) as Python floats."""
    tally = MetricTally(o, m, o.float_dtype(lq_y), lq_y)
    tally.add(w, lq_y, mask, kl)
    return tally.metrics(count)


_BIG = 3.0e38  # min/max sentinel over positions that do not count


class MetricTally:
    """Running sums (and k_* minima and maxima) of the metrics hpd.loss reports.

    They stay arrays until `metrics`, so a chunked caller synchronises once."""

    def __init__(self, o, method: Method, dtype, like):
        self.o, self.method = o, method
        self.zero = o.zeros((), dtype, like)
        self.sums: dict[str, Any] = {"objective": self.zero, "nll": self.zero}
        self.counts: dict[str, Any] = {}  # diagnostics with a narrower domain: its size
        self.lows: dict[str, Any] = {}
        self.highs: dict[str, Any] = {}

    def add(self, w: Weights, log_q_y, mask, kl=None) -> None:
        o = self.o

        def masked_sum(x, where):
            # where(), not a product: lq_y is -inf at ignored positions that point at a
            # masked vocabulary entry, and 0 * -inf is NaN
            x = o.stop_gradient(x)
            return o.sum(o.where(where, x, o.zeros_like(x)))

        self.sums["objective"] = self.sums["objective"] + masked_sum(w.value, mask)
        self.sums["nll"] = self.sums["nll"] - masked_sum(log_q_y, mask)
        if kl is not None:
            self.sums["kl"] = self.sums.get("kl", self.zero) + masked_sum(kl, mask)
        for name, x in w.diagnostics.items():
            where = mask
            if name in w.domains:
                where = mask & w.domains[name]
                self.counts[name] = self.counts.get(name, self.zero) + masked_sum(o.zeros_like(x) + 1.0, where)
            self.sums[name] = self.sums.get(name, self.zero) + masked_sum(x, where)
            if name.startswith("k_"):
                x = o.stop_gradient(x)
                low = o.min(o.where(where, x, o.zeros_like(x) + _BIG))
                high = o.max(o.where(where, x, o.zeros_like(x) - _BIG))
                old_low, old_high = self.lows.get(name, low), self.highs.get(name, high)
                self.lows[name] = o.where(low < old_low, low, old_low)
                self.highs[name] = o.where(high > old_high, high, old_high)

    def arrays(self) -> list:
        return [*self.sums.values(), *self.counts.values(), *self.lows.values(), *self.highs.values()]

    def metrics(self, count: float) -> dict[str, float]:
        o, name = self.o, self.method.name
        out = {"tokens": count, "objective": o.item(self.sums["objective"]) / max(count, 1.0),
               "nll": o.item(self.sums["nll"]) / max(count, 1.0)}
        if "kl" in self.sums:
            out["kl"] = o.item(self.sums["kl"]) / max(count, 1.0)
        if self.method.full_vocab:
            out[name] = out["objective"]
        for key, total in self.sums.items():
            if key in ("objective", "nll", "kl"):
                continue
            n = o.item(self.counts[key]) if key in self.counts else count
            out[f"{name}/{key}"] = o.item(total) / max(n, 1.0)
            if key.startswith("k_"):
                out[f"{name}/{key}_min"] = 0.0 if n == 0 else o.item(self.lows[key])
                out[f"{name}/{key}_max"] = 0.0 if n == 0 else o.item(self.highs[key])
        return out


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
