"""The objective catalogue: every method is a weight rule over the student's log-likelihood.

For a position with student log-probs lq and teacher log-probs lp (both over the
vocabulary), a rule returns weights w on a support S (the whole vocabulary, the data
token y, a token s sampled from the student) such that

    grad objective = - sum_{v in S} w(v) * grad log q(v)

with w held constant. The rules below are written once against the ops shim and run on
torch tensors and mlx arrays alike. Each full-vocabulary rule also returns the literal
divergence's value per position, which is what the loss reports (its gradient is the
reweighted one: the two agree, which the tests check against autograd).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpd.objectives.ops import LOG_FLOOR


@dataclass
class Weights:
    """What a rule returns for a block of positions (shapes without the vocab axis are (...))."""

    value: Any  # (...) the objective's value per position
    full: Any = None  # (..., V) weights over the whole vocabulary, or None
    sparse: list[tuple[Any, Any]] = field(default_factory=list)  # [(token ids (...), weights (...))]
    diagnostics: dict[str, Any] = field(default_factory=dict)  # name -> (...) per-position values
    # name -> (...) bool: positions a diagnostic is averaged over, where narrower than all active ones
    domains: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    default: float
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    help: str = ""

    def check(self, method: str, name: str, value: float) -> float:
        value = float(value)
        ok_low = value > self.low if self.low_open else value >= self.low
        ok_high = value < self.high if self.high_open else value <= self.high
        if math.isnan(value) or not (ok_low and ok_high):
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            raise ValueError(
                f"{method}: {name}={value} is out of range; allowed {lo}{self.low}, {self.high}{hi}"
            )
        return value


@dataclass(frozen=True)
class Method:
    name: str
    rule: Callable[..., Weights]
    params: dict[str, Param]
    needs_sample: bool = False
    full_vocab: bool = True
    help: str = ""
    # the rule also takes sorted_lp: the teacher's log-probs sorted descending (over the
    # teacher's own vocabulary where the source sees one; `hpd.objectives.teacher.sorted_log_probs`)
    sorted_teacher: bool = False


TEMPERATURE = Param(1.0, 0.0, math.inf, low_open=True, high_open=True, help="softmax temperature for both models")


# ---------------------------------------------------------------------------- rules
# Arguments: o (ops), lq, lp: (..., V) detached log-probs at the temperature (floored),
# y, s: (...) data tokens and sampled tokens (s is None unless the method needs it).


def _kl(o, la, lb):
    """KL(a || b) per position from log-probs."""
    return o.sum(o.exp(la) * (la - lb), axis=-1)


def _log_mix(o, la, lb, weight_a):
    """log(weight_a * a + (1 - weight_a) * b), formed in log space: where a and b both
    underflow (log-probs below about -104 in float32), exp-then-add gives log 0 and the
    skew KL weights exp(la - log m) then overflow to NaN."""
    if weight_a <= 0.0:
        return lb
    if weight_a >= 1.0:
        return la
    return o.logaddexp(la + math.log(weight_a), lb + math.log1p(-weight_a))


def ruled_out(lp):
    """Vocabulary entries the teacher rules out: -inf logits (a masked vocabulary), which
    the LOG_FLOOR clamp turns into exactly LOG_FLOOR. The reverse-KL terms drop them, as
    torchtune's and DistiLLM's losses do, instead of charging q * (log q - LOG_FLOOR)."""
    return lp <= LOG_FLOOR


def _rkl_terms(o, lq, lp):
    """(per-entry q * (log q - log p), weights) of KL(q || p) over the entries the teacher
    allows. The weight q * (log p - log q) of the full sum gains q on the dropped entries:
    the gradient of the restricted sum is -sum_allowed q (log p - log q - 1) grad log q,
    and -sum_allowed q grad log q = +sum_dropped q grad log q (the q-weighted grad log q
    sums to zero), so where nothing is dropped the weights are the usual ones."""
    q = o.exp(lq)
    out = ruled_out(lp)
    zero = 0.0 * q
    return o.where(out, zero, q * (lq - lp)), o.where(out, q, q * (lp - lq))


def sft(o, lq, lp, y, s):
    nll = -o.take(lq, y)
    return Weights(value=nll, sparse=[(y, o.full_like(nll, 1.0))])


def fkl(o, lq, lp, y, s):
    p = o.exp(lp)
    return Weights(value=o.sum(p * (lp - lq), axis=-1), full=p)


def rkl(o, lq, lp, y, s):
    terms, full = _rkl_terms(o, lq, lp)
    return Weights(value=o.sum(terms, axis=-1), full=full)


def jsd(o, lq, lp, y, s, beta):
    # TRL's convention: m = beta*p + (1-beta)*q; beta*KL(p||m) + (1-beta)*KL(q||m).
    # The mixture degenerates at the ends, where the limits are taken as fkl and rkl.
    if beta == 0.0:
        return fkl(o, lq, lp, y, s)
    if beta == 1.0:
        return rkl(o, lq, lp, y, s)
    lm = _log_mix(o, lp, lq, beta)
    value = beta * _kl(o, lp, lm) + (1.0 - beta) * _kl(o, lq, lm)
    return Weights(value=value, full=(1.0 - beta) * o.exp(lq) * (lm - lq))


def tvd(o, lq, lp, y, s):
    p, q = o.exp(lp), o.exp(lq)
    return Weights(value=0.5 * o.sum(o.abs(p - q), axis=-1), full=0.5 * q * o.sign(p - q))


def skew_fkl(o, lq, lp, y, s, alpha):
    # DistiLLM: KL(p || alpha*p + (1-alpha)*q).
    lm = _log_mix(o, lp, lq, alpha)
    # q * p / m as one exp: q * exp(lp - lm) is 0 * inf where q underflows and m does too
    return Weights(value=_kl(o, lp, lm), full=(1.0 - alpha) * o.exp(lq + lp - lm))


def skew_rkl(o, lq, lp, y, s, alpha):
    # DistiLLM: KL(q || alpha*q + (1-alpha)*p).
    lm = _log_mix(o, lq, lp, alpha)
    q = o.exp(lq)
    return Weights(value=_kl(o, lq, lm), full=q * (lm - lq) + alpha * o.exp(lq + lq - lm))


def akl(o, lq, lp, y, s, mu):
    # Adaptive KL (Wu et al. 2024): the teacher's head (cumulative mass up to mu, at
    # least its top token) and tail; the gap |p - q| in each sets the per-position
    # mix of forward (head) and reverse (tail) KL. The mix is held constant.
    p, q = o.exp(lp), o.exp(lq)
    order = o.argsort_desc(p)
    p_sorted = o.take_along(p, order)
    gap = o.abs(p_sorted - o.take_along(q, order))
    cum = o.cumsum(p_sorted)
    tail = (cum > mu) & (cum - p_sorted > 0)
    g_tail = o.sum(o.where(tail, gap, 0.0 * gap), axis=-1)
    g_head = o.sum(gap, axis=-1) - g_tail
    total = o.maximum(g_head + g_tail, 1e-30)
    head_share, tail_share = g_head / total, g_tail / total
    rkl_terms, rkl_full = _rkl_terms(o, lq, lp)
    value = head_share * _kl(o, lp, lq) + tail_share * o.sum(rkl_terms, axis=-1)
    full = head_share[..., None] * p + tail_share[..., None] * rkl_full
    return Weights(value=value, full=full, diagnostics={"head_share": head_share})


def todi(o, lq, lp, y, s, beta):
    # ToDi (Jung et al. 2025): per-token alpha = sigmoid(beta * log(p/q)), held constant,
    # mixing alpha * p log(p/q) and (1 - alpha) * q log(q/p).
    p, q = o.exp(lp), o.exp(lq)
    alpha = o.sigmoid(beta * (lp - lq))
    terms = alpha * p * (lp - lq) + (1.0 - alpha) * q * (lq - lp)
    full = alpha * p + (1.0 - alpha) * q * (lp - lq - 1.0)
    # entries the teacher rules out leave the sum (see ruled_out): their whole term and weight
    out = ruled_out(lp)
    value = o.sum(o.where(out, 0.0 * terms, terms), axis=-1)
    full = o.where(out, 0.0 * full, full)
    return Weights(value=value, full=full)


def hpd(o, lq, lp, y, s):
    """The HPD rule (DESIGN.md), on the data token y and one student sample s."""
    lq_y, lp_y = o.take(lq, y), o.take(lp, y)
    lq_s, lp_s = o.take(lq, s), o.take(lp, s)
    k_y = o.exp(lq_y) * (lp_y - lq_y)
    k_s = o.exp(lq_s) * (lp_s - lq_s)
    p_y = o.exp(lp_y)
    zero = 0.0 * k_y
    # A sample the teacher rules out (a -inf logit: a masked vocabulary, or a student token
    # the cross-tokenizer teacher does not share) counts as no sample: it takes no weight
    # and adds nothing to y's (the step is the one a sample equal to y gives), as the
    # reverse-KL terms of rkl, akl and todi drop such tokens. Charged, its
    # k_s = q_s * (LOG_FLOOR - log q_s) would be a floor constant ~1e4 times any real weight.
    # The sample term's expectation is then the reverse KL over the tokens the teacher scores.
    scored = ~ruled_out(lp_s)
    under_y = k_y > 0  # student underestimates y: forward and reverse both push up
    over_s = (k_s < 0) & scored  # student overestimates s
    w_y = o.where(under_y, p_y + k_y, k_y)
    w_y = w_y + o.where(under_y & over_s, p_y, zero)
    s_active = over_s & (s != y)
    w_s = o.where(s_active, k_s, zero)
    value = -(w_y * lq_y + w_s * lq_s)
    one, none = zero + 1.0, zero
    diagnostics = {
        "sample_differs": o.where(s != y, one, none),
        "neg_w_y": o.where(w_y < 0, one, none),
        "active_w_s": o.where(s_active, one, none),
        "both_masks": o.where(under_y & over_s, one, none),
        "k_y": k_y,
        "k_s": k_s,
    }
    # as in the authors' logs, k at the sample is summarised where the sample differs from y
    # (and the teacher scores it: a ruled-out sample's k_s is the floor constant)
    return Weights(value=value, sparse=[(y, w_y), (s, w_s)], diagnostics=diagnostics,
                   domains={"k_s": (s != y) & scored})


def uld(o, lq, lp, y, s, sorted_lp):
    """ULD's sorted-probability distance (Boizard et al. 2024): sum_i |q_(i) - p_(i)| over
    both distributions sorted in decreasing order, a closed-form bound on the Wasserstein-1
    distance that needs no pairing of the vocabularies. sorted_lp: (..., V) the teacher's
    log-probs sorted descending over its own vocabulary, cut or padded (with LOG_FLOOR) to
    the student's V; the teacher's mass beyond rank V pairs with the student's padding, a
    constant left out of the value.

    d/d q_v = sign(q_v - p_(rank v)): as a reweighted log-likelihood w_v = -q_v * that sign,
    scattered back from the sorted order (ties take either order: a subgradient)."""
    q = o.exp(lq)
    order = o.argsort_desc(q)
    diff = o.take_along(q, order) - o.exp(sorted_lp)
    value = o.sum(o.abs(diff), axis=-1)
    full = o.put_along(o.zeros_like(q), order, -o.take_along(q, order) * o.sign(diff))
    return Weights(value=value, full=full)


_BETA_JSD = Param(0.5, 0.0, 1.0, help="mixture weight of the teacher (0: forward KL, 1: reverse KL)")
_ALPHA = Param(0.1, 0.0, 1.0, high_open=True, help="skew: weight of the divergence's first argument in the mixture")

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sft", sft, {}, full_vocab=False, help="log-likelihood of the data tokens"),
        Method("fkl", fkl, {}, help="forward KL(p || q)"),
        Method("rkl", rkl, {}, help="reverse KL(q || p)"),
        Method("jsd", jsd, {"beta": _BETA_JSD}, help="generalized Jensen-Shannon (TRL convention)"),
        Method("tvd", tvd, {}, help="total variation distance"),
        Method("skew_fkl", skew_fkl, {"alpha": _ALPHA}, help="skew forward KL (DistiLLM)"),
        Method("skew_rkl", skew_rkl, {"alpha": _ALPHA}, help="skew reverse KL (DistiLLM)"),
        Method("akl", akl, {"mu": Param(0.5, 0.0, 1.0, low_open=True, help="head mass threshold")},
               help="adaptive KL: head/tail mix of forward and reverse KL"),
        Method("todi", todi, {"beta": Param(1.0, 0.0, math.inf, high_open=True, help="sigmoid sharpness")},
               help="token-wise sigmoid mix of forward and reverse KL"),
        Method("hpd", hpd, {}, needs_sample=True, full_vocab=False,
               help="hybrid policy distillation: data token plus one student sample per position"),
        Method("uld", uld, {}, sorted_teacher=True,
               help="ULD's sorted-probability distance (no shared vocabulary needed; --uld-weight adds it)"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def resolve_params(method: Method, params: dict[str, Any]) -> dict[str, float]:
    """Defaults filled in and ranges checked; temperature is handled by the caller."""
    unknown = set(params) - set(method.params)
    if unknown:
        allowed = ", ".join(["temperature", *method.params]) or "temperature"
        raise ValueError(
            f"{method.name}: unknown parameter(s) {', '.join(sorted(unknown))}; allowed: {allowed}"
        )
    return {
        name: spec.check(method.name, name, params.get(name, spec.default))
        for name, spec in method.params.items()
    }
