"""Numerical edge cases, held on both loss paths (plain and chunked) and both frameworks:
skew KL where both distributions underflow, teacher entries ruled out with -inf, and
targets the shared vocabulary cannot score."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hpd  # noqa: E402

FRAMEWORKS = ["torch", "mlx"]


def _mx():
    return pytest.importorskip("mlx.core", reason="mlx is not importable here")


def plain_loss_and_grad(fw, method, zs, zt, y, **params):
    """hpd.loss in float32 on `fw`; (value, grad w.r.t. the student logits) as numpy."""
    if fw == "torch":
        x = torch.tensor(np.asarray(zs, np.float32), requires_grad=True)
        value, _ = hpd.loss(method, x, torch.tensor(np.asarray(zt, np.float32)), torch.as_tensor(y), **params)
        (grad,) = torch.autograd.grad(value, x)
        return float(value.detach()), grad.numpy().astype(np.float64)
    mx = _mx()

    def f(x):
        return hpd.loss(method, x, mx.array(np.asarray(zt, np.float32)), mx.array(np.asarray(y, np.int32)),
                        **params)[0]

    value, grad = mx.value_and_grad(f)(mx.array(np.asarray(zs, np.float32)))
    return float(value.item()), np.array(grad).astype(np.float64)


def chunked_loss_and_grad(fw, method, hs, head_s, ht, head_t, y, **params):
    """hpd.chunked_loss in float32; (value, grad w.r.t. the student hidden states)."""
    if fw == "torch":
        h = torch.tensor(np.asarray(hs, np.float32), requires_grad=True)
        value, _ = hpd.chunked_loss(method, h, torch.tensor(np.asarray(head_s, np.float32)),
                                    torch.tensor(np.asarray(ht, np.float32)),
                                    torch.tensor(np.asarray(head_t, np.float32)), torch.as_tensor(y),
                                    chunk_size=2, **params)
        (grad,) = torch.autograd.grad(value, h)
        return float(value.detach()), grad.numpy().astype(np.float64)
    mx = _mx()

    def f(h):
        return hpd.chunked_loss(method, h, mx.array(np.asarray(head_s, np.float32)),
                                mx.array(np.asarray(ht, np.float32)), mx.array(np.asarray(head_t, np.float32)),
                                mx.array(np.asarray(y, np.int32)), chunk_size=2, **params)[0]

    value, grad = mx.value_and_grad(f)(mx.array(np.asarray(hs, np.float32)))
    return float(value.item()), np.array(grad).astype(np.float64)


def identity_heads(zs, zt):
    """Hidden states and heads whose logits are exactly zs and zt (head = identity)."""
    v = zs.shape[-1]
    return zs, np.eye(v), zt, np.eye(v)


# ----------------------------------------------------------------- skew KL underflow

def skew_reference(method, zs, zt, y, alpha):
    """Float64 literal skew KL (no underflow at these magnitudes) and its autograd gradient."""
    x = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    lq, lp = torch.log_softmax(x, -1), torch.log_softmax(torch.tensor(zt, dtype=torch.float64), -1)
    q, p = lq.exp(), lp.exp()
    if method == "skew_fkl":
        value = (p * (lp - torch.log(alpha * p + (1 - alpha) * q))).sum(-1)
    else:
        value = (q * (lq - torch.log(alpha * q + (1 - alpha) * p))).sum(-1)
    mask = torch.as_tensor(y) >= 0
    total = value[mask].sum() / mask.sum()
    (grad,) = torch.autograd.grad(total, x)
    return float(total), grad.numpy()


UNDERFLOW_S = np.array([[[0.0, -120.0, 5.0], [1.0, 2.0, -200.0]]])
UNDERFLOW_T = np.array([[[0.0, -130.0, 3.0], [0.5, 2.5, -190.0]]])
UNDERFLOW_Y = np.array([[0, 1]])


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method", ["skew_fkl", "skew_rkl"])
@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_skew_kl_survives_underflow_of_both_distributions(fw, method, path):
    # the issue's reproducer: log p and log q of token 1 are both below float32 underflow
    if path == "plain":
        value, grad = plain_loss_and_grad(fw, method, UNDERFLOW_S, UNDERFLOW_T, UNDERFLOW_Y, alpha=0.1)
    else:
        value, grad = chunked_loss_and_grad(fw, method, *identity_heads(UNDERFLOW_S, UNDERFLOW_T),
                                            UNDERFLOW_Y, alpha=0.1)
    ref_value, ref_grad = skew_reference(method, UNDERFLOW_S, UNDERFLOW_T, UNDERFLOW_Y, 0.1)
    assert math.isfinite(value) and np.isfinite(grad).all()
    assert abs(value - ref_value) <= 1e-5 * max(1.0, abs(ref_value))
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("method", ["skew_fkl", "skew_rkl"])
def test_skew_kl_finite_on_realistic_float32_logits(method):
    # V = 32000, std 8, temperature 0.5: many tokens underflow in both models at once
    rng = np.random.default_rng(0)
    zs = torch.tensor(rng.normal(0, 8, (2, 3, 32000)), dtype=torch.float32, requires_grad=True)
    zt = torch.tensor(rng.normal(0, 8, (2, 3, 32000)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, 32000, (2, 3)))
    value, _ = hpd.loss(method, zs, zt, y, temperature=0.5, alpha=0.1)
    (grad,) = torch.autograd.grad(value, zs)
    assert math.isfinite(float(value)) and bool(torch.isfinite(grad).all())


# ------------------------------------------------------------- teacher -inf entries

def dropped_reference(method, zs, zt, y, **params):
    """The convention of torchtune and DistiLLM: vocabulary entries the teacher rules out
    (-inf logits) leave the sums. Float64 value and autograd gradient."""
    x = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    zt = torch.tensor(zt, dtype=torch.float64)
    keep = torch.isfinite(zt)
    lq, lp = torch.log_softmax(x, -1), torch.log_softmax(zt, -1)
    q, p = lq.exp(), lp.exp()
    lp_safe = torch.where(keep, lp, torch.zeros_like(lp))

    def rkl_terms():
        return torch.where(keep, q * (lq - lp_safe), torch.zeros_like(q))

    if method == "rkl":
        value = rkl_terms().sum(-1)
    elif method == "todi":
        a = torch.sigmoid(params["beta"] * (lp - lq)).detach()
        value = torch.where(keep, a * p * (lp_safe - lq) + (1 - a) * q * (lq - lp_safe),
                            torch.zeros_like(q)).sum(-1)
    elif method == "akl":
        p_sorted, order = torch.sort(p, dim=-1, descending=True)
        q_sorted = torch.gather(q, -1, order)
        head = torch.cumsum(p_sorted, dim=-1) <= params["mu"]
        head[..., 0] = True
        gap = (p_sorted - q_sorted).abs()
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        h, t = (g_head / (g_head + g_tail)).detach(), (g_tail / (g_head + g_tail)).detach()
        fkl = torch.where(keep, p * (lp_safe - lq), torch.zeros_like(q)).sum(-1)
        value = h * fkl + t * rkl_terms().sum(-1)
    else:
        raise AssertionError(method)
    mask = torch.as_tensor(y) >= 0
    total = value[mask].sum() / mask.sum()
    (grad,) = torch.autograd.grad(total, x)
    return float(total), grad.numpy()


def masked_teacher_problem(seed=0, v=9):
    rng = np.random.default_rng(seed)
    zs = rng.normal(0, 2, (2, 3, v))
    zt = rng.normal(0, 2, (2, 3, v))
    zt[..., [1, 4]] = -np.inf  # a masked vocabulary: the teacher rules these tokens out
    y = rng.choice([0, 2, 3, 5, 6, 7, 8], size=(2, 3))
    y[1, 2] = -100
    return zs, zt, y


def masked_chunked_inputs(zs, zt):
    """Heads that produce zt's -inf entries from finite hidden states: a leading 1 in the
    teacher's hidden state meets -inf in the masked rows' first column."""
    v = zs.shape[-1]
    finite = np.where(np.isfinite(zt), zt, 0.0)
    ht = np.concatenate([np.ones(zt.shape[:-1] + (1,)), finite], axis=-1)
    head_t = np.concatenate([np.zeros((v, 1)), np.eye(v)], axis=-1)
    head_t[~np.isfinite(zt[0, 0]), 0] = -np.inf
    head_t[~np.isfinite(zt[0, 0]), 1:] = 0.0
    return zs, np.eye(v), ht, head_t


CASES = [("rkl", {}), ("todi", {"beta": 1.0}), ("akl", {"mu": 0.5})]


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method, params", CASES)
@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_teacher_ruled_out_tokens_are_dropped(fw, method, params, path):
    zs, zt, y = masked_teacher_problem()
    if path == "plain":
        value, grad = plain_loss_and_grad(fw, method, zs, zt, y, **params)
    else:
        value, grad = chunked_loss_and_grad(fw, method, *masked_chunked_inputs(zs, zt), y, **params)
    ref_value, ref_grad = dropped_reference(method, zs, zt, y, **params)
    assert ref_value < 20  # the floored log p made rkl ~1e3 here
    assert abs(value - ref_value) <= 1e-5 * max(1.0, abs(ref_value)), (value, ref_value)
    np.testing.assert_allclose(grad, ref_grad, atol=2e-6)


def test_issue_rkl_example_matches_torchtune_convention():
    # the student keeps some mass on a token the teacher rules out
    zs = torch.tensor([[[2.0, 0.0, 1.0]]], requires_grad=True)
    zt = torch.tensor([[[2.0, -math.inf, 1.0]]])
    value, _ = hpd.loss("rkl", zs, zt, torch.tensor([[0]]))
    lq = torch.log_softmax(zs.detach(), -1)
    lp = torch.log_softmax(zt, -1)
    expected = float((lq.exp() * (lq - lp))[..., [0, 2]].sum())
    assert abs(float(value) - expected) < 1e-6


# ------------------------------------------------------- targets outside the vocabulary

@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_target_outside_shared_vocabulary_names_the_row(fw, path):
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 8))  # shared vocabulary: 6
    y = rng.integers(0, 6, size=(3, 4))
    y[0, 0] = -100
    y[2, 1] = 7  # the teacher could score it, the student cannot
    with pytest.raises(ValueError, match=r"row 2.*position 1.*7.*vocabulary.*6"):
        if path == "plain":
            plain_loss_and_grad(fw, "fkl", zs, zt, y)
        else:
            chunked_loss_and_grad(fw, "fkl", zs, np.eye(6), zt, np.eye(8), y)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_negative_target_other_than_ignore_index_is_an_error(fw):
    rng = np.random.default_rng(2)
    zs, zt = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    y = rng.integers(0, 5, size=(2, 3))
    y[1, 0] = -1
    with pytest.raises(ValueError, match="row 1"):
        plain_loss_and_grad(fw, "sft", zs, zt, y)
