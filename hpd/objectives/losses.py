"""`hpd.loss`: a method's loss and metrics from student logits, teacher logits and targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpd.objectives.ops import ops_for
from hpd.objectives.rules import (
    LOG_FLOOR,
    TEMPERATURE,
    Method,
    Weights,
    get_method,
    resolve_params,
)
from hpd.objectives.teacher import LogitsTeacher, as_source, sorted_log_probs


@dataclass(frozen=True)
class Supervised:
    """One loss call's settings and the positions whose target counts, set up alike for
    the plain loss (`loss`) and the chunked one (`hpd.objectives.chunked`).

    Every array is over the active positions only, in row-major order of the targets."""

    method: Method
    params: dict[str, float]
    temperature: float
    vocab: int  # the shared prefix of the two vocabularies
    index: Any  # (N,) flat positions of the active targets
    targets: Any  # (N,)
    sampled: Any  # (N,) given student samples, or None
    uniforms: Any  # (N,) uniforms for inverse-CDF samples, or None (and None when sampled is given)
    count: float  # N
    denom: float  # what the summed objective is divided by
    groups: Any = None  # (N,) group of each position in [0, group_count), or None
    group_count: int = 0  # metrics are also reported per group (group/<g>/...)


def supervised(method: str, o, targets, vocab: int, *, like, sampled=None, uniforms=None, ignore_index: int = -100,
               num_tokens: float | None = None, temperature: float = 1.0, params: dict | None = None,
               groups=None) -> Supervised:
    """The method, its checked parameters and temperature, and the active positions with
    their targets and (for a method that samples) the given samples or uniforms.

    `like`: an array of the student's (uniforms are placed beside it). `groups`: None, or
    ((B, T) group ids, group count), for metrics per group. A target outside the shared
    vocabulary that is not `ignore_index` is an error (`active_positions`)."""
    m = get_method(method)
    temperature = TEMPERATURE.check(method, "temperature", temperature)
    params = resolve_params(m, dict(params or {}))
    mask, y = active_positions(o, targets, vocab, ignore_index)
    index = o.nonzero(mask)
    s = u = None
    if m.needs_sample and sampled is not None:
        s = o.rows(_check_sampled(o, sampled, targets, vocab).reshape((-1,)), index)
    elif m.needs_sample and uniforms is not None:
        u = o.rows(_check_uniforms(o, uniforms, targets, like), index)
    count = float(index.shape[0])
    g, group_count = None, 0
    if groups is not None:
        ids, group_count = groups
        if tuple(ids.shape) != tuple(targets.shape):
            raise ValueError(f"groups has shape {tuple(ids.shape)}, targets {tuple(targets.shape)}; they must match")
        g = o.rows(o.int_array(ids).reshape((-1,)), index)
    return Supervised(method=m, params=params, temperature=temperature, vocab=vocab, index=index,
                      targets=o.rows(y.reshape((-1,)), index), sampled=s, uniforms=u, count=count,
                      denom=float(num_tokens) if num_tokens is not None else max(count, 1.0), groups=g,
                      group_count=int(group_count))


def student_sample(o, method: Method, logits, sampled=None, uniforms=None, log_probs=None):
    """The student's token per position for a method that takes one (None otherwise): the
    given samples, else one drawn by inverse CDF with `uniforms` from `log_probs` (the
    log-softmax of `logits` when not given), else by Gumbel-max with the framework's RNG."""
    if not method.needs_sample:
        return None
    if sampled is not None:
        return sampled
    if uniforms is not None:
        if log_probs is None:
            log_probs = o.log_softmax(o.stop_gradient(logits))
        return sample_with_uniforms(o, log_probs, uniforms)
    return sample_tokens(o, logits)


def weighted_objectives(objectives, term):
    """(sum of weight * value, [each objective's other output]) over a step's objectives
    (anything with .method, .weight and .params), where term(objective) -> (value, other)."""
    total, others = None, []
    for obj in objectives:
        value, other = term(obj)
        value = value * obj.weight if obj.weight != 1.0 else value
        total = value if total is None else total + value
        others.append(other)
    return total, others


def loss(
    method: str,
    student_logits,
    teacher_logits,
    targets,
    *,
    sampled=None,
    uniforms=None,
    ignore_index: int = -100,
    num_tokens: float | None = None,
    temperature: float = 1.0,
    groups=None,
    **params: Any,
):
    """Reweighted log-likelihood loss of `method` and its metrics.

    student_logits, teacher_logits: (B, T, V) torch tensors or mlx arrays, where
    logits[..., t, :] scores targets[..., t]; teacher_logits may also be any
    `hpd.objectives.teacher.TeacherSource` (an offline store, say). targets: (B, T) integers;
    positions equal to `ignore_index` (or outside the shared vocabulary) do not count,
    and are dropped before any vocabulary-sized work. sampled: (B, T) student samples
    for methods that use them; when None they are drawn here, without gradient, by
    inverse CDF from `uniforms` (B, T) in [0, 1) if given, else with the framework's RNG.
    num_tokens: divide by this count instead of the local count of active positions
    (the training loop passes the global count over accumulation steps and ranks).
    groups: ((B, T) integer ids, count): the objective and KL are also reported per group,
    as group/<g>/objective and group/<g>/kl (means over the group's positions) beside
    group/<g>/tokens (their count); the rows of several teachers, say.

    Returns (loss, metrics): a differentiable scalar and a dict of Python floats.
    """
    o = ops_for(student_logits)
    teacher = as_source(teacher_logits)
    vocab = _shared_vocab(student_logits, teacher, targets)
    sup = supervised(method, o, targets, vocab, like=student_logits, sampled=sampled, uniforms=uniforms,
                     ignore_index=ignore_index, num_tokens=num_tokens, temperature=temperature, params=params,
                     groups=groups)
    m = sup.method
    dtype = o.compute_dtype(student_logits)
    zs = o.rows(student_logits.reshape((-1, student_logits.shape[-1])), sup.index)  # (N, V_s)
    zs = o.astype(zs[:, :vocab], dtype)
    if sup.temperature != 1.0:
        zs = zs / sup.temperature
    if sup.count == 0:  # nothing counts: a zero that still reaches the graph
        return o.sum(zs) / sup.denom, MetricTally(o, m, dtype, zs, sup.group_count).metrics(0.0)
    selected = teacher.select(o, sup.index)
    lp = selected.log_probs(o, slice(None), vocab, sup.temperature, dtype)
    sorted_lp = (sorted_log_probs(o, selected, slice(None), vocab, sup.temperature, dtype, lp)
                 if m.sorted_teacher else None)
    s = student_sample(o, m, zs, sup.sampled, sup.uniforms)
    per_pos, weights, log_q_y, kl = objective_terms(o, m, zs, lp, sup.targets, s, sup.params, sorted_lp=sorted_lp)
    tally = MetricTally(o, m, o.float_dtype(log_q_y), log_q_y, sup.group_count)
    tally.add(weights, log_q_y, None, kl, groups=sup.groups)
    return o.sum(per_pos) / sup.denom, tally.metrics(sup.count)


def token_kl(o, m: Method, w: Weights, lq, lp):
    """KL(teacher || student) per position, from log-probs the step already holds.

    It is what to watch when a method's loss value is a surrogate (hpd, sft): comparable
    across methods and runs. fkl's value is this KL already."""
    return w.value if m.name == "fkl" else o.sum(o.exp(lp) * (lp - lq), axis=-1)


def objective_terms(o, m: Method, zs, lp, y, s, params, sorted_lp=None) -> tuple[Any, Weights, Any, Any]:
    """Per-position objective (..., differentiable in zs), the rule's weights, the
    student's log-prob of y (unfloored, without gradient) and the token-level KL to the
    teacher, both for the metrics. lp: the teacher's log-probs; sorted_lp: its sorted
    view for a method that takes one (None: lp sorted).

    The value equals the rule's reported value (the literal divergence for the
    full-vocabulary methods); its gradient is -sum w * grad log q.
    """
    log_q = o.log_softmax(zs)  # (..., V)
    logq = o.maximum(log_q, LOG_FLOOR)
    lp = o.maximum(o.stop_gradient(lp), LOG_FLOOR)
    lq = o.stop_gradient(logq)
    extra = {}
    if m.sorted_teacher:
        extra["sorted_lp"] = o.maximum(o.stop_gradient(o.sort_desc(lp) if sorted_lp is None else sorted_lp),
                                       LOG_FLOOR)
    w = m.rule(o, lq, lp, y, s, **extra, **params)
    surrogate = None
    if w.full is not None:
        surrogate = -o.sum(o.stop_gradient(w.full) * logq, axis=-1)
    for idx, weight in w.sparse:
        term = -o.stop_gradient(weight) * o.take(logq, idx)
        surrogate = term if surrogate is None else surrogate + term
    per_pos = surrogate + o.stop_gradient(w.value - surrogate)
    return per_pos, w, o.take(o.stop_gradient(log_q), y), token_kl(o, m, w, lq, lp)


def active_positions(o, targets, vocab: int, ignore_index: int):
    """(mask, safe targets): mask marks positions that count; ignored ones point at 0.

    A target that is neither `ignore_index` nor inside the shared vocabulary is an error
    in the data or the tokenizer (the smaller model cannot score it): it is named, not
    silently left out of the loss."""
    targets = o.int_array(targets)
    ignored = targets == ignore_index
    outside = ~ignored & ((targets < 0) | (targets >= vocab))
    if o.count(outside) > 0:
        _raise_outside(o, targets, outside, vocab, ignore_index)
    mask = ~ignored
    return mask, o.where(mask, targets, 0 * targets)


def _raise_outside(o, targets, outside, vocab: int, ignore_index: int):
    import numpy as np

    shape = tuple(targets.shape)
    flat = o.int_array(outside.reshape((-1,)))
    index = int(o.item(o.argmax(flat)))  # the first offending position
    value = int(o.item(targets.reshape((-1,))[index]))
    where = np.unravel_index(index, shape)
    if len(shape) >= 2:
        at = f"row {', '.join(map(str, where[:-1]))}, position {where[-1]}"
    else:
        at = f"position {where[0]}"
    raise ValueError(
        f"targets {at}: token id {value} is outside the shared vocabulary [0, {vocab}) and is not "
        f"the ignore index {ignore_index}; the data or the tokenizer does not match the models"
    )


def sample_tokens(o, logits, generator=None):
    """One token per position from softmax(logits), by Gumbel-max, without gradient."""
    z = o.stop_gradient(logits)
    return o.argmax(z + o.gumbel_like(z, generator))


def sample_with_uniforms(o, log_probs, u):
    """One token per row of log_probs (N, V) by inverse CDF with u (N,) in [0, 1).

    Token i is drawn when cdf[i-1] <= u * cdf[-1] < cdf[i], so a token of probability 0
    never is, whatever the rounding; the draw depends only on the row and its uniform,
    not on how positions are split across chunks, micro-batches or processes."""
    cdf = o.cumsum(o.exp(o.stop_gradient(log_probs)))  # (N, V)
    vocab = cdf.shape[-1]
    threshold = u.reshape((-1, 1)) * cdf[:, vocab - 1:vocab]
    drawn = o.int_array(o.sum(o.int_array(cdf <= threshold), axis=-1))
    return o.where(drawn > vocab - 1, drawn * 0 + (vocab - 1), drawn)


_BIG = 3.0e38  # min/max sentinel over positions that do not count


class MetricTally:
    """Running sums (and k_* minima and maxima) of the metrics hpd.loss reports.

    They stay arrays until `metrics`, so a chunked caller synchronises once."""

    def __init__(self, o, method: Method, dtype, like, group_count: int = 0):
        self.o, self.method, self.group_count = o, method, group_count
        self.zero = o.zeros((), dtype, like)
        self.sums: dict[str, Any] = {"objective": self.zero, "nll": self.zero}
        # per group g: the objective's and the KL's sums and the positions (group/<g>/...)
        self.groups: dict[str, Any] = {f"group/{g}/{k}": self.zero for g in range(group_count)
                                       for k in ("objective", "kl", "tokens")}
        self.counts: dict[str, Any] = {}  # diagnostics with a narrower domain: its size
        self.lows: dict[str, Any] = {}
        self.highs: dict[str, Any] = {}

    def add(self, w: Weights, log_q_y, mask=None, kl=None, groups=None) -> None:
        """Add positions' metrics; `mask` (N,) marks those that count (None: all);
        `groups` (N,): each position's group, when the tally counts groups."""
        o = self.o
        if 0 in tuple(log_q_y.shape):
            return  # no positions: nothing to add (and no minimum of nothing)

        def masked_sum(x, where):
            # where(), not a product: lq_y is -inf at ignored positions that point at a
            # masked vocabulary entry, and 0 * -inf is NaN
            x = o.stop_gradient(x)
            return o.sum(x if where is None else o.where(where, x, o.zeros_like(x)))

        for g in range(self.group_count if groups is not None else 0):
            where = groups == g if mask is None else mask & (groups == g)
            for key, x in (("objective", w.value), ("kl", kl), ("tokens", o.zeros_like(w.value) + 1.0)):
                if x is not None:
                    self.groups[f"group/{g}/{key}"] = self.groups[f"group/{g}/{key}"] + masked_sum(x, where)
        self.sums["objective"] = self.sums["objective"] + masked_sum(w.value, mask)
        self.sums["nll"] = self.sums["nll"] - masked_sum(log_q_y, mask)
        if kl is not None:
            self.sums["kl"] = self.sums.get("kl", self.zero) + masked_sum(kl, mask)
        for name, x in w.diagnostics.items():
            where = mask
            if name in w.domains:
                where = w.domains[name] if mask is None else mask & w.domains[name]
                self.counts[name] = self.counts.get(name, self.zero) + masked_sum(o.zeros_like(x) + 1.0, where)
            self.sums[name] = self.sums.get(name, self.zero) + masked_sum(x, where)
            if name.startswith("k_"):
                x = o.stop_gradient(x)
                low = o.min(x if where is None else o.where(where, x, o.zeros_like(x) + _BIG))
                high = o.max(x if where is None else o.where(where, x, o.zeros_like(x) - _BIG))
                old_low, old_high = self.lows.get(name, low), self.highs.get(name, high)
                self.lows[name] = o.where(low < old_low, low, old_low)
                self.highs[name] = o.where(high > old_high, high, old_high)

    def arrays(self) -> list:
        return [*self.sums.values(), *self.counts.values(), *self.lows.values(), *self.highs.values(),
                *self.groups.values()]

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
        for key, total in self.groups.items():  # means over the group's positions
            tokens = o.item(self.groups[key.rsplit("/", 1)[0] + "/tokens"])
            out[key] = tokens if key.endswith("/tokens") else o.item(total) / max(tokens, 1.0)
        return out


def _shared_vocab(student_logits, teacher, targets) -> int:
    s_shape, y_shape = tuple(student_logits.shape), tuple(targets.shape)
    t_shape = tuple(teacher.logits.shape) if isinstance(teacher, LogitsTeacher) else None
    if len(s_shape) < 2 or s_shape[:-1] != y_shape or (t_shape is not None and t_shape[:-1] != y_shape):
        raise ValueError(
            "shape mismatch: student logits "
            f"{s_shape}, teacher logits {t_shape}, targets {y_shape}; expected (..., V) logits "
            "with the same leading shape as the targets (vocabulary sizes may differ)"
        )
    return min(s_shape[-1], teacher.vocab)


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


def _check_uniforms(o, uniforms, targets, like):
    if tuple(uniforms.shape) != tuple(targets.shape):
        raise ValueError(f"uniforms has shape {tuple(uniforms.shape)}, targets {tuple(targets.shape)}; "
                         "they must match")
    return o.uniforms(uniforms, like).reshape((-1,))


def metric_names(metrics: dict, method: str, objectives: int) -> dict:
    """With several objectives, each one's metrics under its method's name."""
    metrics = {k: v for k, v in metrics.items() if not k.startswith("group/")}  # reported by name instead
    if objectives == 1:
        return metrics
    # the KL to the teacher is the same whichever objective reports it
    return {(k if "/" in k or k == "kl" else f"{method}/{k}"): v for k, v in metrics.items()}
