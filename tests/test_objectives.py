"""Tests for the objective catalogue behind `hpd.loss`.

The references below are written from the definitions (DESIGN.md and the papers), in
plain torch with autograd, and share no code with the library: the library computes a
reweighted surrogate whose gradient must equal the gradient of the literal divergence,
and whose reported value must equal the literal divergence itself.

Framework-neutral checks (numerics, vocabulary handling, sampling) run on torch and on
mlx through a small backend adapter; the mlx cases skip when mlx is not importable.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the objective tests need torch for the autograd references")

import hpd  # noqa: E402
from hpd.objectives.losses import sample_tokens  # noqa: E402
from hpd.objectives.ops import ops_for  # noqa: E402

IGNORE = -100

# Every full-vocabulary case checked against its literal divergence.
FULL_VOCAB_CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("tvd", {}),
    ("skew_fkl", {"alpha": 0.1}),
    ("skew_fkl", {"alpha": 0.5}),
    ("skew_fkl", {"alpha": 0.9}),
    ("skew_rkl", {"alpha": 0.1}),
    ("skew_rkl", {"alpha": 0.5}),
    ("skew_rkl", {"alpha": 0.9}),
    ("akl", {"mu": 0.5}),
    ("akl", {"mu": 0.2}),
    ("todi", {"beta": 1.0}),
    ("todi", {"beta": 4.0}),
    ("uld", {}),
]
ALL_CASES = [("sft", {}), *FULL_VOCAB_CASES, ("hpd", {})]
FULL_VOCAB_METHODS = ["fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "akl", "todi", "uld"]


def case_id(case):
    method, params = case
    return method + "".join(f"-{k}{v}" for k, v in params.items())


# ------------------------------------------------------------------------ helpers


def make_inputs(seed, B=2, T=5, V=11, V_teacher=None, scale=2.0):
    """Random logits (float64 numpy) and targets with a few ignored positions."""
    rng = np.random.default_rng(seed)
    zs = rng.normal(size=(B, T, V)) * scale
    zt = rng.normal(size=(B, T, V if V_teacher is None else V_teacher)) * scale
    y = rng.integers(0, min(V, V_teacher or V), size=(B, T))
    y[0, 1] = y[B - 1, T - 2] = IGNORE
    return zs, zt, y


def random_samples(seed, shape, V):
    return np.random.default_rng(seed + 1000).integers(0, V, size=shape)


def assert_close(actual, expected, rtol, what="", atol=0.0):
    """Max abs error within rtol times the largest expected magnitude (plus atol)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max())
    bound = rtol * float(np.abs(expected).max()) + atol
    assert err <= bound, f"{what}: max abs error {err:.3g} exceeds {bound:.3g}"


def torch_loss_and_grad(method, zs, zt, y, **kw):
    """hpd.loss on float64 torch tensors; returns (loss, d loss / d student logits, metrics)."""
    x = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    sampled = kw.pop("sampled", None)
    if sampled is not None:
        sampled = torch.as_tensor(sampled)
    value, metrics = hpd.loss(
        method, x, torch.tensor(zt, dtype=torch.float64), torch.as_tensor(y), sampled=sampled, **kw
    )
    (grad,) = torch.autograd.grad(value, x)
    return value, grad, metrics


# --------------------------------------------------------------------- references


def literal_divergence(method, zs, zt, **params):
    """Per-position divergence between teacher p = softmax(zt) and student q = softmax(zs)."""
    lq, lp = torch.log_softmax(zs, dim=-1), torch.log_softmax(zt, dim=-1)
    q, p = lq.exp(), lp.exp()

    def kl(a, log_a, log_b):  # KL(a || b)
        return (a * (log_a - log_b)).sum(-1)

    if method == "fkl":
        return kl(p, lp, lq)
    if method == "rkl":
        return kl(q, lq, lp)
    if method == "jsd":  # TRL: m = beta p + (1 - beta) q, ends taken as fkl / rkl
        beta = params["beta"]
        if beta == 0.0:
            return kl(p, lp, lq)
        if beta == 1.0:
            return kl(q, lq, lp)
        lm = torch.log(beta * p + (1 - beta) * q)
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if method == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if method == "skew_fkl":
        a = params["alpha"]
        return kl(p, lp, torch.log(a * p + (1 - a) * q))
    if method == "skew_rkl":
        a = params["alpha"]
        return kl(q, lq, torch.log(a * q + (1 - a) * p))
    if method == "akl":  # Wu et al. 2024, head/tail shares held constant
        p_sorted, order = torch.sort(p, dim=-1, descending=True)
        q_sorted = torch.gather(q, -1, order)
        head = torch.cumsum(p_sorted, dim=-1) <= params["mu"]
        head[..., 0] = True  # the top token is always in the head
        gap = (p_sorted - q_sorted).abs()
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        h = (g_head / (g_head + g_tail)).detach()
        t = (g_tail / (g_head + g_tail)).detach()
        return h * kl(p, lp, lq) + t * kl(q, lq, lp)
    if method == "todi":  # per-token sigmoid mix, held constant
        a = torch.sigmoid(params["beta"] * (lp - lq)).detach()
        return (a * p * (lp - lq) + (1 - a) * q * (lq - lp)).sum(-1)
    if method == "uld":  # Boizard et al. 2024: L1 between the sorted distributions
        ps, qs = torch.sort(p, dim=-1, descending=True).values, torch.sort(q, dim=-1, descending=True).values
        return (qs - ps).abs().sum(-1)
    raise AssertionError(f"no reference for {method}")


def reference_hpd(zs, zt, y, s):
    """DESIGN.md's HPD rule, position by position with Python floats for the weights.

    Returns the loss (differentiable in zs), the metrics the library should report, and
    per-position records of which branch of the rule applied.
    """
    lq = torch.log_softmax(zs, dim=-1)
    lp = torch.log_softmax(zt, dim=-1).detach()
    terms, rows = [], []
    B, T = y.shape
    for b in range(B):
        for t in range(T):
            yt, st = int(y[b, t]), int(s[b, t])
            q_s, p_s = math.exp(lq[b, t, st].item()), math.exp(lp[b, t, st].item())
            k_s = q_s * (math.log(p_s) - math.log(q_s))
            if yt == IGNORE:
                rows.append({"ignored": True, "k_s": k_s})  # kept to check the k statistics' masking
                continue
            q_y, p_y = math.exp(lq[b, t, yt].item()), math.exp(lp[b, t, yt].item())
            k_y = q_y * (math.log(p_y) - math.log(q_y))
            w_y = p_y + k_y if k_y > 0 else k_y
            both = k_y > 0 and k_s < 0
            if both:
                w_y += p_y
            s_active = k_s < 0 and st != yt
            w_s = k_s if s_active else 0.0
            terms.append(-(w_y * lq[b, t, yt] + w_s * lq[b, t, st]))
            rows.append(dict(ignored=False, same=st == yt, k_y=k_y, k_s=k_s, w_y=w_y,
                             s_active=s_active, both=both, nll=-lq[b, t, yt].item()))
    n = len(terms)
    value = torch.stack(terms).sum() / n
    act = [r for r in rows if not r["ignored"]]

    def share(key):
        return sum(bool(r[key]) for r in act) / n

    metrics = {
        "tokens": float(n),
        "objective": value.item(),
        "nll": sum(r["nll"] for r in act) / n,
        "hpd/sample_differs": 1.0 - share("same"),
        "hpd/neg_w_y": sum(r["w_y"] < 0 for r in act) / n,
        "hpd/active_w_s": share("s_active"),
        "hpd/both_masks": share("both"),
    }
    # k at the data token over active positions; k at the sample where it differs from y
    for k, rows_k in (("k_y", act), ("k_s", [r for r in act if not r["same"]])):
        vals = [r[k] for r in rows_k]
        metrics[f"hpd/{k}"] = sum(vals) / len(vals)
        metrics[f"hpd/{k}_min"] = min(vals)
        metrics[f"hpd/{k}_max"] = max(vals)
    return value, metrics, rows


# ------------------------------------------------------------ backend adapters


class TorchBackend:
    name = "torch"

    def __init__(self):
        self.float32, self.bfloat16, self.float16 = torch.float32, torch.bfloat16, torch.float16

    def floats(self, x, dtype=None):
        return torch.tensor(np.asarray(x, dtype=np.float32)).to(dtype or torch.float32)

    def ints(self, x):
        return torch.as_tensor(np.asarray(x, dtype=np.int64))

    def numpy(self, x):
        return x.detach().to(torch.float64).numpy() if x.is_floating_point() else x.numpy()

    def seed(self, n):
        torch.manual_seed(n)

    def loss_and_grad(self, method, zs, zt, y, sampled=None, **kw):
        """(loss array, grad as float64 numpy, metrics) for array inputs of this backend."""
        x = zs.clone().requires_grad_(True)
        value, metrics = hpd.loss(method, x, zt, y, sampled=sampled, **kw)
        (grad,) = torch.autograd.grad(value, x)
        return value, self.numpy(grad), metrics


class MlxBackend:
    name = "mlx"

    def __init__(self, mx):
        self.mx = mx
        self.float32, self.bfloat16, self.float16 = mx.float32, mx.bfloat16, mx.float16

    def floats(self, x, dtype=None):
        return self.mx.array(np.asarray(x, dtype=np.float32)).astype(dtype or self.mx.float32)

    def ints(self, x):
        return self.mx.array(np.asarray(x, dtype=np.int32))

    def numpy(self, x):
        if self.mx.issubdtype(x.dtype, self.mx.floating):
            x = x.astype(self.mx.float32)
        return np.array(x)

    def seed(self, n):
        self.mx.random.seed(n)

    def loss_and_grad(self, method, zs, zt, y, sampled=None, **kw):
        out = {}

        def f(x):  # metrics are Python floats, so they leave through a side channel
            value, out["metrics"] = hpd.loss(method, x, zt, y, sampled=sampled, **kw)
            return value

        value, grad = self.mx.value_and_grad(f)(zs)
        return value, self.numpy(grad).astype(np.float64), out["metrics"]


@pytest.fixture(params=["torch", "mlx"])
def backend(request):
    if request.param == "torch":
        return TorchBackend()
    mx = pytest.importorskip("mlx.core", reason="mlx is not importable here")
    return MlxBackend(mx)


def scalar(x):
    return float(x.item())


# ------------------------------------------------------------------ catalogue


def test_catalogue_is_fully_covered():
    # A method added to the catalogue without a case here would go untested.
    assert set(hpd.METHODS) == {m for m, _ in ALL_CASES}
    assert sorted(m for m in hpd.METHODS if hpd.METHODS[m].full_vocab) == sorted(FULL_VOCAB_METHODS)


# ------------------------------------------- full-vocabulary methods vs. autograd


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("case", FULL_VOCAB_CASES, ids=case_id)
def test_full_vocab_matches_literal_divergence(case, temperature):
    method, params = case
    zs, zt, y = make_inputs(seed=1)
    value, grad, metrics = torch_loss_and_grad(method, zs, zt, y, temperature=temperature, **params)

    # The literal divergence at the temperature (both logits divided by T), averaged
    # over active positions, differentiated by autograd.
    x = torch.tensor(zs, requires_grad=True)
    per_pos = literal_divergence(method, x / temperature, torch.tensor(zt) / temperature, **params)
    active = torch.as_tensor(y) != IGNORE
    ref = per_pos[active].mean()
    (ref_grad,) = torch.autograd.grad(ref, x)

    assert value.dtype == torch.float64
    assert_close(value.item(), ref.item(), 1e-6, "loss value")
    assert_close(grad.numpy(), ref_grad.numpy(), 1e-6, "gradient")
    assert torch.all(grad[~active] == 0), "ignored positions must get no gradient"
    assert metrics["tokens"] == active.sum().item()
    assert_close(metrics[method], ref.item(), 1e-6, "reported divergence metric")


def test_num_tokens_replaces_the_local_count():
    zs, zt, y = make_inputs(seed=2)
    n_active = int((y != IGNORE).sum())
    value, grad, _ = torch_loss_and_grad("fkl", zs, zt, y)
    value_n, grad_n, _ = torch_loss_and_grad("fkl", zs, zt, y, num_tokens=40)
    assert_close(value_n.item() * 40, value.item() * n_active, 1e-12, "value")
    assert_close(grad_n.numpy() * 40, grad.numpy() * n_active, 1e-12, "gradient")


# -------------------------------------------------------------- closed forms


@pytest.mark.parametrize("shifted", [False, True], ids=["same-logits", "shifted-logits"])
@pytest.mark.parametrize("method", FULL_VOCAB_METHODS)
def test_identical_distributions_give_zero(method, shifted):
    zs, _, y = make_inputs(seed=3)
    zt = zs.copy()
    if shifted:  # a shift per position leaves the softmax unchanged, up to rounding
        zt += np.random.default_rng(0).normal(size=zs.shape[:-1] + (1,))
    value, grad, _ = torch_loss_and_grad(method, zs, zt, y)
    assert abs(value.item()) < 1e-12
    if shifted and method in ("tvd", "uld"):
        return  # |p - q| has a kink at 0: rounding noise picks the sign, as in autograd
    assert grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("beta, equivalent", [(0.0, "fkl"), (1.0, "rkl")])
def test_jsd_ends_are_forward_and_reverse_kl(beta, equivalent):
    zs, zt, y = make_inputs(seed=4)
    value, grad, _ = torch_loss_and_grad("jsd", zs, zt, y, beta=beta)
    value_kl, grad_kl, _ = torch_loss_and_grad(equivalent, zs, zt, y)
    assert value_kl.item() > 1e-3  # the distributions differ, so this compares something
    assert_close(value.item(), value_kl.item(), 1e-12, "value")
    assert_close(grad.numpy(), grad_kl.numpy(), 1e-12, "gradient")


def test_sft_is_mean_nll_of_targets():
    zs, zt, y = make_inputs(seed=5)
    value, grad, metrics = torch_loss_and_grad("sft", zs, zt, y)
    x = torch.tensor(zs, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        x.reshape(-1, x.shape[-1]), torch.as_tensor(y).reshape(-1), ignore_index=IGNORE
    )
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert_close(value.item(), ref.item(), 1e-12, "value")
    assert_close(grad.numpy(), ref_grad.numpy(), 1e-12, "gradient")
    assert_close(metrics["nll"], ref.item(), 1e-12, "nll metric")


# ------------------------------------------------------------------------ hpd


def hpd_inputs():
    """Logits, targets and samples built so that every branch of the rule occurs."""
    B, T, V = 2, 6, 11
    zs, zt, _ = make_inputs(seed=6, B=B, T=T, V=V, scale=1.0)
    y = np.random.default_rng(7).integers(0, V, size=(B, T))
    s = np.random.default_rng(8).integers(0, V, size=(B, T))
    boost = 5.0

    def position(b, t, target, sample, teacher=(), student=()):
        y[b, t], s[b, t] = target, sample
        zt[b, t, list(teacher)] += boost
        zs[b, t, list(student)] += boost

    position(0, 0, 2, 5, teacher=[2], student=[5])  # k(y) > 0 and k(s) < 0: both masks
    position(0, 1, 3, 3, teacher=[3])  # s == y, student underestimates y
    position(0, 2, 1, 1, student=[1])  # s == y, student overestimates y: w_y < 0
    position(0, 3, IGNORE, 7, student=[7])  # ignored, with a k(s) below every active one
    zt[0, 3, 7] -= 3 * boost
    position(0, 4, 4, 6, student=[4, 6])  # w_y < 0 and an active w_s, not both masks
    position(0, 5, 0, 9, teacher=[0, 9])  # k(y) > 0, k(s) > 0: w_s inactive
    # Ignored, with k(s) = q log(p/q) near its maximum 1/e (q(s) = 1/e, p(s) = 1): above
    # every active one.
    zs[1, 2] = 0.0
    zs[1, 2, 2] = math.log((V - 1) / (math.e - 1))
    position(1, 2, IGNORE, 2)
    zt[1, 2, 2] += 4 * boost
    return zs, zt, y, s


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_hpd_matches_design_rule(temperature):
    zs, zt, y, s = hpd_inputs()
    value, grad, metrics = torch_loss_and_grad("hpd", zs, zt, y, sampled=s, temperature=temperature)

    x = torch.tensor(zs, requires_grad=True)
    ref, ref_metrics, rows = reference_hpd(x / temperature, torch.tensor(zt) / temperature, y, s)
    (ref_grad,) = torch.autograd.grad(ref, x)

    # The construction must really exercise every branch of the rule.
    act = [r for r in rows if not r["ignored"]]
    assert any(r["ignored"] for r in rows)
    assert any(r["same"] for r in act)
    assert any(r["both"] for r in act)
    assert any(r["w_y"] < 0 for r in act)
    assert any(r["s_active"] and not r["both"] for r in act)
    assert any(not r["same"] and r["k_y"] > 0 and r["k_s"] > 0 for r in act)
    ignored_k_s = [r["k_s"] for r in rows if r["ignored"]]
    assert min(ignored_k_s) < ref_metrics["hpd/k_s_min"] and max(ignored_k_s) > ref_metrics["hpd/k_s_max"]

    assert_close(value.item(), ref.item(), 1e-9, "loss value")
    assert_close(grad.numpy(), ref_grad.numpy(), 1e-9, "gradient")
    assert torch.all(grad[torch.as_tensor(y) == IGNORE] == 0)
    for key, expected in ref_metrics.items():
        assert key in metrics, f"metric {key} missing"
        assert_close(metrics[key], expected, 1e-9, key, atol=1e-12)


def test_hpd_rejects_bad_samples():
    zs, zt, y, s = hpd_inputs()
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        torch_loss_and_grad("hpd", zs, zt, y, sampled=s[:, :5])
    with pytest.raises(ValueError, match="11"):
        torch_loss_and_grad("hpd", zs, zt, y, sampled=s + 11)


# ---------------------------------------------------------- torch vs. mlx


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_torch_and_mlx_agree(case, temperature):
    mx = pytest.importorskip("mlx.core", reason="mlx is not importable here")
    tb, mb = TorchBackend(), MlxBackend(mx)
    method, params = case
    zs, zt, y = make_inputs(seed=9)
    s = random_samples(9, y.shape, zs.shape[-1])
    results = []
    for b in (tb, mb):
        sampled = b.ints(s) if method == "hpd" else None
        value, grad, metrics = b.loss_and_grad(
            method, b.floats(zs), b.floats(zt), b.ints(y), sampled=sampled, temperature=temperature, **params
        )
        assert value.dtype == b.float32
        results.append((scalar(value), grad, metrics))
    (v_t, g_t, m_t), (v_m, g_m, m_m) = results
    # Tolerance: float32 on both sides, different kernels; 1e-5 of the largest magnitude.
    assert_close(v_m, v_t, 1e-5, "loss", atol=1e-7)
    assert_close(g_m, g_t, 1e-5, "gradient", atol=1e-8)
    assert m_m.keys() == m_t.keys()
    for key in m_t:
        assert_close(m_m[key], m_t[key], 1e-5, key, atol=1e-6)


# ------------------------------------------------------------------- sampling


def test_sample_tokens_follow_student_softmax(backend):
    # Many positions sharing one small vocabulary: the draw frequencies must match softmax.
    logits = np.array([0.0, 0.7, 1.5, -1.0, 2.2, -np.inf], dtype=np.float32)
    n = 40_000
    backend.seed(0)
    draws = backend.numpy(sample_tokens(ops_for(backend.floats(logits)), backend.floats(np.tile(logits, (n, 1)))))
    assert draws.shape == (n,)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    freq = np.bincount(draws.astype(np.int64), minlength=len(logits)) / n
    assert freq[-1] == 0, "a -inf logit must never be drawn"
    # Deviation bound: the largest standard error is sqrt(0.25 / n) = 0.0025.
    assert np.abs(freq - probs).max() < 0.01
    # Chi-square over the 5 live tokens (4 dof); 18.47 is the 0.999 quantile.
    live = probs > 0
    chi2 = float(n * (((freq[live] - probs[live]) ** 2) / probs[live]).sum())
    assert chi2 < 18.47


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hpd_draws_its_samples_from_the_student(backend, temperature):
    # With sampled=None the share of samples that differ from y estimates 1 - E[q(y)].
    # y is the student's top token (a y independent of q would give 1 - 1/V for any
    # sampler), and the teacher ranks it last, so drawing from the teacher would show.
    # The student is q at the temperature, the same q that the rule's weights use.
    rng = np.random.default_rng(10)
    V, n = 6, 20_000
    rows = rng.normal(size=(4, V)) * 1.5
    zs = rows[np.arange(n) % 4][None]
    zt = -2.0 * zs
    y = zs.argmax(-1)
    q = np.exp((zs - zs.max(-1, keepdims=True)) / temperature)
    q /= q.sum(-1, keepdims=True)
    expected = 1.0 - q.max(-1).mean()
    backend.seed(1)
    _, metrics = hpd.loss("hpd", backend.floats(zs), backend.floats(zt), backend.ints(y), temperature=temperature)
    assert abs(metrics["hpd/sample_differs"] - expected) < 0.015  # > 4 standard errors


def test_hpd_sampling_is_seeded(backend):
    zs, zt, y = make_inputs(seed=11, B=4, T=16, scale=0.5)
    args = (backend.floats(zs), backend.floats(zt), backend.ints(y))

    def run(seed):
        backend.seed(seed)
        value, metrics = hpd.loss("hpd", *args)
        return scalar(value), metrics

    first, again, other = run(123), run(123), run(321)
    assert first == again
    assert first != other, "a different seed should draw different samples"


# ------------------------------------------------------------------- numerics


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_low_precision_is_computed_in_float32(backend, case):
    method, params = case
    zs, zt, y = make_inputs(seed=12)
    s = backend.ints(random_samples(12, y.shape, zs.shape[-1]))
    sampled = s if method == "hpd" else None
    for low in (backend.bfloat16, backend.float16):
        zs_low, zt_low = backend.floats(zs, low), backend.floats(zt, low)
        value, grad, _ = backend.loss_and_grad(method, zs_low, zt_low, backend.ints(y), sampled=sampled, **params)
        # The float32 result on exactly the same (rounded) values: computing in the low
        # precision itself would be off by about 1e-2.
        ref, ref_grad, _ = backend.loss_and_grad(
            method, backend.floats(backend.numpy(zs_low)), backend.floats(backend.numpy(zt_low)),
            backend.ints(y), sampled=sampled, **params,
        )
        assert value.dtype == backend.float32
        assert_close(scalar(value), scalar(ref), 1e-6, f"loss ({low})", atol=1e-7)
        # The gradient comes back in the input's dtype, so only its rounding separates them.
        assert_close(grad, ref_grad, 1e-2, f"gradient ({low})")


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_masked_vocab_entries_are_harmless(backend, case):
    # -inf at the same entries of both models must behave as if those entries did not exist.
    method, params = case
    zs, zt, y = make_inputs(seed=13)
    masked = [0, 7]
    kept = [v for v in range(zs.shape[-1]) if v not in masked]
    remap = {v: i for i, v in enumerate(kept)}
    rng = np.random.default_rng(13)
    y = np.where(y == IGNORE, IGNORE, rng.choice(kept, size=y.shape))
    s = rng.choice(kept, size=y.shape)
    zs[..., masked] = zt[..., masked] = -np.inf

    def run(zs, zt, y, s):
        sampled = backend.ints(s) if method == "hpd" else None
        return backend.loss_and_grad(method, backend.floats(zs), backend.floats(zt), backend.ints(y),
                                     sampled=sampled, **params)

    value, grad, metrics = run(zs, zt, y, s)
    to_small = np.vectorize(lambda v: remap.get(v, v))
    ref, ref_grad, _ = run(zs[..., kept], zt[..., kept], to_small(y), to_small(s))

    assert math.isfinite(scalar(value))
    assert np.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert np.all(grad[..., masked] == 0)
    assert_close(scalar(value), scalar(ref), 1e-5, "loss", atol=1e-7)
    assert_close(grad[..., kept], ref_grad, 1e-5, "gradient", atol=1e-8)


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_all_masked_batch_gives_zero(backend, case):
    method, params = case
    zs, zt, y = make_inputs(seed=14)
    y[:] = IGNORE
    sampled = backend.ints(random_samples(14, y.shape, zs.shape[-1])) if method == "hpd" else None
    value, grad, metrics = backend.loss_and_grad(
        method, backend.floats(zs), backend.floats(zt), backend.ints(y), sampled=sampled, **params
    )
    assert scalar(value) == 0.0
    assert np.isfinite(grad).all() and np.all(grad == 0)
    assert metrics["tokens"] == 0
    assert all(math.isfinite(v) for v in metrics.values()), metrics


# --------------------------------------------------------------- vocabularies


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_differing_vocabularies_use_the_shared_prefix(backend, case):
    for student_vocab, teacher_vocab in [(13, 11), (11, 13)]:
        check_shared_prefix(backend, *case, student_vocab, teacher_vocab)


def check_shared_prefix(backend, method, params, student_vocab, teacher_vocab):
    shared = min(student_vocab, teacher_vocab)
    zs, zt, _ = make_inputs(seed=15, V=student_vocab, V_teacher=teacher_vocab)
    # targets outside the shared vocabulary are an error (tests/test_numerics_edges.py)
    y = np.random.default_rng(15).integers(0, shared, size=zs.shape[:2])
    y[0, 0], y[1, 1], y[1, 2] = shared - 1, 0, IGNORE
    s = random_samples(15, y.shape, shared)
    sampled = backend.ints(s) if method == "hpd" else None

    value, grad, metrics = backend.loss_and_grad(
        method, backend.floats(zs), backend.floats(zt), backend.ints(y), sampled=sampled, **params
    )
    y_shared = y
    ref, ref_grad, ref_metrics = backend.loss_and_grad(
        method, backend.floats(zs[..., :shared]), backend.floats(zt[..., :shared]), backend.ints(y_shared),
        sampled=sampled, **params,
    )
    assert metrics["tokens"] == ref_metrics["tokens"] == (y_shared != IGNORE).sum()
    assert_close(scalar(value), scalar(ref), 1e-6, "loss", atol=1e-7)
    assert_close(grad[..., :shared], ref_grad, 1e-6, "gradient", atol=1e-8)
    assert np.all(grad[..., shared:] == 0)


@pytest.mark.parametrize(
    "student_shape, teacher_shape, target_shape",
    [
        ((2, 5, 11), (2, 4, 11), (2, 5)),  # teacher positions differ
        ((2, 5, 11), (3, 5, 11), (2, 5)),  # teacher batch differs
        ((2, 5, 11), (2, 5, 11), (2, 4)),  # targets differ
        ((2, 5, 11), (2, 5, 11), (10,)),  # targets flattened
    ],
)
def test_shape_mismatch_names_both_shapes(backend, student_shape, teacher_shape, target_shape):
    rng = np.random.default_rng(16)
    zs, zt = rng.normal(size=student_shape), rng.normal(size=teacher_shape)
    y = rng.integers(0, 11, size=target_shape)
    with pytest.raises(ValueError) as err:
        hpd.loss("fkl", backend.floats(zs), backend.floats(zt), backend.ints(y))
    message = str(err.value)
    mismatched = teacher_shape if teacher_shape != student_shape else target_shape
    assert str(student_shape) in message and str(mismatched) in message


# ---------------------------------------------------------------- bad arguments


def tiny_batch():
    zs, zt, y = make_inputs(seed=17)
    return torch.tensor(zs), torch.tensor(zt), torch.as_tensor(y)


def test_unknown_method_lists_methods():
    with pytest.raises(ValueError) as err:
        hpd.loss("kl", *tiny_batch())
    assert all(name in str(err.value) for name in hpd.METHODS)


@pytest.mark.parametrize(
    "method, params, allowed",
    [("fkl", {"beta": 0.5}, ["temperature"]), ("jsd", {"alpha": 0.5}, ["temperature", "beta"]),
     ("akl", {"beta": 0.5}, ["temperature", "mu"])],
)
def test_unknown_parameter_lists_parameters(method, params, allowed):
    with pytest.raises(ValueError) as err:
        hpd.loss(method, *tiny_batch(), **params)
    message = str(err.value)
    assert next(iter(params)) in message
    assert all(name in message for name in allowed), message


@pytest.mark.parametrize(
    "method, params, name, bounds",
    [
        ("jsd", {"beta": 1.5}, "beta", ("0.0", "1.0")),
        ("jsd", {"beta": -0.1}, "beta", ("0.0", "1.0")),
        ("fkl", {"temperature": 0.0}, "temperature", ("0.0", "inf")),
        ("fkl", {"temperature": -1.0}, "temperature", ("0.0", "inf")),
        ("fkl", {"temperature": float("nan")}, "temperature", ("0.0", "inf")),
        ("akl", {"mu": 0.0}, "mu", ("0.0", "1.0")),
        ("skew_fkl", {"alpha": 1.0}, "alpha", ("0.0", "1.0")),
        ("todi", {"beta": -1.0}, "beta", ("0.0", "inf")),
    ],
)
def test_out_of_range_parameter_names_the_range(method, params, name, bounds):
    with pytest.raises(ValueError) as err:
        hpd.loss(method, *tiny_batch(), **params)
    message = str(err.value)
    assert name in message and "allowed" in message
    assert all(bound in message for bound in bounds), message


# ------------------------------------------------------------------- import cost


def test_import_hpd_pulls_in_no_framework():
    code = (
        "import sys, hpd; hpd.loss; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("method", ["hpd", "sft", "rkl", "jsd", "fkl"])
def test_every_method_reports_the_token_kl(method):
    import torch

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 0] = -100
    _, metrics = hpd.loss(method, s, t, y)
    _, reference = hpd.loss("fkl", s, t, y)
    assert metrics["kl"] == pytest.approx(reference["fkl"], rel=1e-5)
