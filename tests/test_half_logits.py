"""Half-precision heads in the chunked loss (hpd.objectives.heads.HALF_LOGITS).

A bfloat16 or float16 head forms each chunk's logits from the weight as stored, with a
float32 log-softmax and float32 sums, instead of a float32 copy of the whole head. On CUDA
the product accumulates and returns float32 (the same numbers as the float32 product of
the same half inputs, up to summation order); on CPU its output is rounded to the half
dtype first. Held here on CPU against the float32 path of the same half weights
("never"), with "always" forcing the half product:

- the loss within 2e-3 relative (bfloat16 logits carry a 2^-8 relative rounding, which
  the loss mostly averages out; float16: 3e-4),
- each gradient within 3e-2 of its largest entry (float16: 6e-3; the logit gradient is
  also rounded to the head's dtype for its product with the head),
- and on CPU "auto" (the default) is the float32 path, bit for bit.
"""

from __future__ import annotations

import pytest

import hpd
import hpd.objectives.heads as heads

torch = pytest.importorskip("torch")

TOL = {torch.bfloat16: (2e-3, 3e-2), torch.float16: (3e-4, 6e-3)}  # measured: 3.4e-4 / 1.2e-2, 3.9e-5 / 2.7e-3


def problem(dtype, method):
    g = torch.Generator().manual_seed(0)
    n, t, hs, ht, v = 3, 17, 32, 48, 300
    sh = torch.randn(n, t, hs, generator=g)
    th = torch.randn(n, t, ht, generator=g).to(dtype)
    sw = (torch.randn(v, hs, generator=g) * 0.7).to(dtype)
    tw = (torch.randn(v, ht, generator=g) * 0.6).to(dtype)
    y = torch.randint(0, v, (n, t), generator=g)
    y[:, :4] = -100
    return sh, sw, th, tw, y


def run(mode, dtype, method, params):
    old = heads.HALF_LOGITS
    heads.HALF_LOGITS = mode
    try:
        sh, sw, th, tw, y = problem(dtype, method)
        sh.requires_grad_(True)
        sw.requires_grad_(True)
        loss, _ = hpd.chunked_loss(method, sh, sw, th, tw, y, chunk_size=16, **params)
        loss.backward()
        return loss.detach(), sh.grad, sw.grad.float()
    finally:
        heads.HALF_LOGITS = old


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,params", [("fkl", {}), ("jsd", {"beta": 0.5}), ("rkl", {})])
def test_half_product_close_to_float32(dtype, method, params):
    ref = run("never", dtype, method, params)
    half = run("always", dtype, method, params)
    loss_tol, grad_tol = TOL[dtype]
    assert torch.isfinite(half[0])
    assert abs(float(half[0] - ref[0])) <= loss_tol * abs(float(ref[0]))
    for a, b in zip(half[1:], ref[1:]):
        assert float((a - b).abs().max()) <= grad_tol * float(b.abs().max())


def test_auto_on_cpu_is_the_float32_path():
    ref = run("never", torch.bfloat16, "fkl", {})
    auto = run("auto", torch.bfloat16, "fkl", {})
    for a, b in zip(auto, ref):
        assert torch.equal(a, b)


def test_float32_head_never_takes_the_half_path():
    from hpd.objectives.ops import ops_for

    w = torch.zeros(4, 4)
    assert not heads.half_logits(ops_for(w), w)
    old = heads.HALF_LOGITS
    heads.HALF_LOGITS = "always"
    try:
        assert not heads.half_logits(ops_for(w), w)
        assert heads.half_logits(ops_for(w), w.bfloat16())
        assert not heads.half_logits(ops_for(w), w.bfloat16(), torch.float64)  # float64 math stays float64
    finally:
        heads.HALF_LOGITS = old


def test_memory_plan_drops_the_float32_head_copy_where_half_logits_apply():
    from hpd.models.memory import Setting, Shape, loss_copies

    teacher = Shape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128,
                    vocab=152064, tied=False, qkv_bias=True)
    student = Shape(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, head_dim=128,
                    vocab=151936, tied=True, qkv_bias=True)
    cast = Setting(backend="torch", teacher_dtype=2)
    half = Setting(backend="torch", teacher_dtype=2, half_logits=True)
    vocab = 151936
    assert loss_copies(teacher, student, cast, 1024, vocab) - loss_copies(teacher, student, half, 1024, vocab) \
        == vocab * teacher.hidden * 4
