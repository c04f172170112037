"""hpd.chunked_loss against hpd.loss: same values, gradients and metrics, without (B, T, V).

Tolerances: float64 compares to rtol 1e-9 / atol 1e-12 (the two paths differ only in
summation order); float32 to rtol 1e-4 / atol 1e-6 on gradients of size ~1e-2. mlx in
float64 gets rtol 1e-5 / atol 5e-7: its float64 exp on the CPU is only float32-accurate
(mlx 0.32), so each path is ~1e-7 off a torch float64 reference on gradients of ~0.5.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import hpd

torch = pytest.importorskip("torch")

try:
    import mlx.core as mx
except ImportError:  # pragma: no cover - depends on the platform
    mx = None

needs_mlx = pytest.mark.skipif(mx is None, reason="mlx is not installed")

B, T, H, H_T, V, V_T = 2, 13, 8, 6, 37, 41
PARAMS = {"jsd": {"beta": 0.3}, "skew_fkl": {"alpha": 0.2}, "skew_rkl": {"alpha": 0.2},
          "akl": {"mu": 0.6}, "todi": {"beta": 2.0}}
METHODS = list(hpd.METHODS)


def tol(dtype: str, fw) -> dict:
    if dtype == "float32":
        return {"rtol": 1e-4, "atol": 1e-6}
    return {"rtol": 1e-9, "atol": 1e-12} if fw.name == "torch" else {"rtol": 1e-5, "atol": 5e-7}


def problem(seed=0, v_s=V, v_t=V_T, dtype="float64"):
    """Random hidden states, heads, targets (with ignored and out-of-vocabulary ones) and samples."""
    rng = np.random.default_rng(seed)
    vocab = min(v_s, v_t)
    targets = rng.integers(0, vocab, size=(B, T))
    targets[0, 3] = targets[1, 0] = -100
    targets[1, 7] = vocab - 1  # the last token of the shared vocabulary
    return {
        "hidden": rng.normal(size=(B, T, H)).astype(dtype),
        "head": (1.5 * rng.normal(size=(v_s, H))).astype(dtype),
        "t_hidden": rng.normal(size=(B, T, H_T)).astype(dtype),
        "t_head": (1.5 * rng.normal(size=(v_t, H_T))).astype(dtype),
        "targets": targets,
        "sampled": rng.integers(0, vocab, size=(B, T)),
    }


class TorchFw:
    name = "torch"

    def array(self, x):
        return torch.tensor(x)

    def value_and_grads(self, fn, *args):
        """(loss, metrics, grads as numpy) of fn(*args) -> (loss, metrics)."""
        leaves = [torch.tensor(a, requires_grad=True) for a in args]
        value, metrics = fn(*leaves)
        value.backward()
        return float(value.detach()), metrics, [leaf.grad.numpy() for leaf in leaves]


class MlxFw:
    name = "mlx"

    def array(self, x):
        x = np.asarray(x)
        # mx.array turns float64 into float32 unless told otherwise.
        return mx.array(x, dtype=mx.float64) if x.dtype == np.float64 else mx.array(x)

    def value_and_grads(self, fn, *args):
        found = {}

        def scalar(*xs):
            value, metrics = fn(*xs)
            found.update(metrics)
            return value

        argnums = tuple(range(len(args)))
        value, grads = mx.value_and_grad(scalar, argnums=argnums)(*[self.array(a) for a in args])
        return value.item(), found, [np.array(g) for g in grads]


FRAMEWORKS = [
    pytest.param(TorchFw(), id="torch"),
    pytest.param(MlxFw() if mx else None, id="mlx", marks=needs_mlx),
]


def both_paths(fw, method, data, **kwargs):
    """(plain, chunked) results of the same loss: each (loss, metrics, [grad hidden, grad head])."""
    t_hidden, t_head = fw.array(data["t_hidden"]), fw.array(data["t_head"])
    targets = fw.array(data["targets"])
    kwargs = {"sampled": fw.array(data["sampled"]), **PARAMS.get(method, {}), **kwargs}
    chunk_size = kwargs.pop("chunk_size", 5)

    def plain(hidden, head):
        return hpd.loss(method, hidden @ head.T, t_hidden @ t_head.T, targets, **kwargs)

    def chunked(hidden, head):
        return hpd.chunked_loss(
            method, hidden, head, t_hidden, t_head, targets, chunk_size=chunk_size, **kwargs
        )

    return [fw.value_and_grads(fn, data["hidden"], data["head"]) for fn in (plain, chunked)]


def assert_same(plain, chunked, dtype, fw):
    (v1, m1, g1), (v2, m2, g2) = plain, chunked
    np.testing.assert_allclose(v2, v1, **tol(dtype, fw))
    assert list(m2) == list(m1)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], err_msg=key, **tol(dtype, fw))
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(b, a, **tol(dtype, fw))


# ------------------------------------------------------------------ equals the plain path


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_chunked_equals_plain(fw, method, dtype):
    data = problem(dtype=dtype)
    plain, chunked = both_paths(fw, method, data, temperature=1.7)
    assert_same(plain, chunked, dtype, fw)
    assert plain[1]["tokens"] == B * T - 2


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method", ["fkl", "akl", "hpd"])
@pytest.mark.parametrize("chunk_size", [1, 7, 26, 1024])
def test_any_chunk_size(fw, method, chunk_size):
    data = problem(seed=1)
    assert_same(*both_paths(fw, method, data, chunk_size=chunk_size), "float64", fw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method", ["sft", "rkl", "skew_rkl", "hpd"])
def test_student_vocabulary_larger_than_teacher(fw, method):
    data = problem(seed=2, v_s=V_T, v_t=V)
    plain, chunked = both_paths(fw, method, data, num_tokens=40.0)
    assert_same(plain, chunked, "float64", fw)
    assert not chunked[2][1][V:].any()  # head rows past the shared vocabulary get no gradient


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_every_position_ignored(fw):
    data = problem(seed=3)
    data["targets"][:] = -100
    plain, chunked = both_paths(fw, "hpd", data)
    assert_same(plain, chunked, "float64", fw)
    assert chunked[0] == 0.0 and chunked[1]["tokens"] == 0.0 and not chunked[2][0].any()


def tied_model_grads(fw, method, data, chunked: bool):
    """Grads of a tiny model whose input embedding is also its output head."""
    ids = np.random.default_rng(5).integers(0, V, size=(B, T))
    mix = np.random.default_rng(6).normal(size=(H, H)).astype("float64")
    t_hidden, t_head = fw.array(data["t_hidden"]), fw.array(data["t_head"])
    targets, sampled = fw.array(data["targets"]), fw.array(data["sampled"])
    params = PARAMS.get(method, {})

    def run(embed, w_in):
        x = embed[fw.array(ids)]
        hidden = (x @ w_in).tanh() if fw.name == "torch" else mx.tanh(x @ w_in)
        if chunked:
            return hpd.chunked_loss(method, hidden, embed, t_hidden, t_head, targets, sampled=sampled,
                                    chunk_size=4, **params)
        return hpd.loss(method, hidden @ embed.T, t_hidden @ t_head.T, targets, sampled=sampled, **params)

    return fw.value_and_grads(run, data["head"], mix)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method", METHODS)
def test_tied_embedding_gets_both_gradients(fw, method):
    data = problem(seed=4)
    plain = tied_model_grads(fw, method, data, chunked=False)
    chunked = tied_model_grads(fw, method, data, chunked=True)
    assert_same(plain, chunked, "float64", fw)


def test_torch_bf16_inputs_upcast():
    data = problem(seed=7, dtype="float32")
    args = [torch.tensor(data[k]) for k in ("hidden", "head", "t_hidden", "t_head")]
    low = [a.to(torch.bfloat16).requires_grad_(i < 2) for i, a in enumerate(args)]
    value, _ = hpd.chunked_loss("fkl", *low, torch.tensor(data["targets"]), chunk_size=5)
    value.backward()
    assert value.dtype == torch.float32 and low[0].grad.dtype == low[1].grad.dtype == torch.bfloat16
    ref = [a.to(torch.bfloat16).float().requires_grad_(i < 2) for i, a in enumerate(args)]
    ref_value, _ = hpd.chunked_loss("fkl", *ref, torch.tensor(data["targets"]), chunk_size=5)
    ref_value.backward()
    torch.testing.assert_close(value, ref_value)  # computed in float32 from the same bf16 values
    torch.testing.assert_close(low[0].grad.float(), ref[0].grad, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(low[1].grad.float(), ref[1].grad, rtol=1e-2, atol=1e-4)


@needs_mlx
def test_mlx_bf16_inputs_upcast():
    data = problem(seed=7, dtype="float32")
    low = [mx.array(data[k]).astype(mx.bfloat16) for k in ("hidden", "head", "t_hidden", "t_head")]
    targets = mx.array(data["targets"])

    def run(hidden, head):
        return hpd.chunked_loss("fkl", hidden, head, *low[2:], targets, chunk_size=5)[0]

    value, grads = mx.value_and_grad(run, argnums=(0, 1))(*low[:2])
    ref_value, ref_grads = mx.value_and_grad(run, argnums=(0, 1))(*[a.astype(mx.float32) for a in low[:2]])
    assert value.dtype == mx.float32 and grads[0].dtype == grads[1].dtype == mx.bfloat16
    np.testing.assert_allclose(value.item(), ref_value.item(), rtol=1e-6)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(ref), rtol=1e-2, atol=1e-4)


def test_torch_without_grad_matches():
    data = problem(seed=8)
    args = [torch.tensor(data[k]) for k in ("hidden", "head", "t_hidden", "t_head", "targets")]
    with_grad, metrics = hpd.chunked_loss("hpd", *args[:1], args[1].requires_grad_(), *args[2:],
                                          sampled=torch.tensor(data["sampled"]))
    with torch.no_grad():
        without, metrics_ng = hpd.chunked_loss("hpd", *args, sampled=torch.tensor(data["sampled"]))
    assert not without.requires_grad and with_grad.requires_grad
    assert float(without) == float(with_grad.detach()) and metrics_ng == metrics


# ------------------------------------------------------------------ the per-chunk sampler


def sample_differs(fw, hidden, head, targets, temperature, seed):
    if fw.name == "torch":
        torch.manual_seed(seed)
    else:
        mx.random.seed(seed)
    t_hidden, t_head = fw.array(np.zeros_like(hidden)), fw.array(np.zeros_like(head))
    _, metrics = hpd.chunked_loss("hpd", fw.array(hidden), fw.array(head), t_hidden, t_head,
                                  fw.array(targets), temperature=temperature, chunk_size=333)
    return metrics["hpd/sample_differs"]


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_sampler_draws_follow_the_softmax(fw):
    """With y = v at every position, the share of samples that differ from y estimates 1 - q(v)."""
    n, vocab, temperature = 4000, 6, 2.0
    head = np.linspace(-1.0, 1.5, vocab, dtype="float32")[:, None] * np.array([[2.0, 1.0]], dtype="float32")
    hidden = np.tile(np.array([1.0, 0.5], dtype="float32"), (1, n, 1))
    q = softmax(hidden[0, 0] @ head.T / temperature)
    for v in range(vocab):
        share = sample_differs(fw, hidden, head, np.full((1, n), v), temperature, seed=v)
        sigma = np.sqrt(q[v] * (1 - q[v]) / n)
        assert abs((1 - share) - q[v]) < 5 * sigma, (v, 1 - share, q[v])


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_sampler_uses_each_positions_own_distribution(fw):
    rng = np.random.default_rng(9)
    n, vocab = 3000, 5
    hidden = (2.0 * rng.normal(size=(1, n, 4))).astype("float32")
    head = rng.normal(size=(vocab, 4)).astype("float32")
    q = softmax(hidden[0] @ head.T)  # (n, vocab)
    targets = q.argmax(-1)[None]  # the likely token, so misaligned draws would differ far more often
    q_y = q[np.arange(n), targets[0]]
    share = sample_differs(fw, hidden, head, targets, 1.0, seed=11)
    sigma = np.sqrt((q_y * (1 - q_y)).sum()) / n
    assert abs(share - (1 - q_y.mean())) < 5 * sigma


# ------------------------------------------------------------------ never (B, T, V)


def largest_tensor_torch(fn):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Recorder(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    self.largest = max(self.largest, x.numel())
            return out

    with Recorder() as recorder:
        fn()
    return recorder.largest


@pytest.mark.parametrize("method", METHODS)
def test_torch_chunked_never_creates_batch_by_length_by_vocab(method):
    data = problem(seed=10, v_s=V, v_t=V)
    hidden = torch.tensor(data["hidden"], requires_grad=True)
    head = torch.tensor(data["head"], requires_grad=True)
    t_hidden, t_head = torch.tensor(data["t_hidden"]), torch.tensor(data["t_head"])
    targets = torch.tensor(data["targets"])
    params = PARAMS.get(method, {})

    def plain():
        hpd.loss(method, hidden @ head.T, t_hidden @ t_head.T, targets, **params)[0].backward()

    def chunked():
        value, _ = hpd.chunked_loss(method, hidden, head, t_hidden, t_head, targets, chunk_size=5, **params)
        value.backward()

    assert largest_tensor_torch(plain) >= B * T * V  # the check can fail
    assert largest_tensor_torch(chunked) < B * T * V
    assert hidden.grad is not None and head.grad is not None


@needs_mlx
@pytest.mark.parametrize("method", ["fkl", "hpd"])
def test_mlx_chunked_peak_memory_stays_below_one_logits_tensor(method):
    rng = np.random.default_rng(12)
    b, t, h, vocab = 2, 1024, 32, 4096
    hidden = mx.array(rng.normal(size=(b, t, h)).astype("float32"))
    head = mx.array(rng.normal(size=(vocab, h)).astype("float32"))
    t_hidden = mx.array(rng.normal(size=(b, t, h)).astype("float32"))
    t_head = mx.array(rng.normal(size=(vocab, h)).astype("float32"))
    targets = mx.array(rng.integers(0, vocab, size=(b, t)))
    mx.eval(hidden, head, t_hidden, t_head, targets)
    logits_bytes = b * t * vocab * 4

    def peak(fn):
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(mx.value_and_grad(fn, argnums=(0, 1))(hidden, head))
        return mx.get_peak_memory()

    def plain(x, w):
        return hpd.loss(method, x @ w.T, t_hidden @ t_head.T, targets)[0]

    def chunked(x, w):
        return hpd.chunked_loss(method, x, w, t_hidden, t_head, targets, chunk_size=32)[0]

    assert peak(plain) > logits_bytes  # the check can fail
    assert peak(chunked) < logits_bytes / 2


# ------------------------------------------------------------------ validation


def test_same_errors_as_plain():
    data = problem()
    hidden, head, t_hidden, t_head, targets = (
        torch.tensor(data[k]) for k in ("hidden", "head", "t_hidden", "t_head", "targets")
    )
    cases = [
        ("nope", {}),
        ("jsd", {"beta": 2.0}),
        ("fkl", {"beta": 0.5}),
        ("fkl", {"temperature": 0.0}),
        ("hpd", {"sampled": torch.zeros(B, T + 1, dtype=torch.long)}),
        ("hpd", {"sampled": torch.full((B, T), V + 5)}),
    ]
    for method, kwargs in cases:
        with pytest.raises(ValueError) as plain_error:
            hpd.loss(method, hidden @ head.T, t_hidden @ t_head.T, targets, **kwargs)
        with pytest.raises(ValueError) as chunked_error:
            hpd.chunked_loss(method, hidden, head, t_hidden, t_head, targets, **kwargs)
        assert str(chunked_error.value) == str(plain_error.value)


def test_bad_shapes_and_chunk_sizes_are_named():
    data = problem()
    hidden, head, t_hidden, t_head, targets = (
        torch.tensor(data[k]) for k in ("hidden", "head", "t_hidden", "t_head", "targets")
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        hpd.chunked_loss("fkl", hidden[:, :-1], head, t_hidden, t_head, targets)
    with pytest.raises(ValueError, match=r"student head has shape \(37, 6\)"):
        hpd.chunked_loss("fkl", hidden, head[:, :6], t_hidden, t_head, targets)
    with pytest.raises(ValueError, match="teacher head"):
        hpd.chunked_loss("fkl", hidden, head, t_hidden, t_head[None], targets)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            hpd.chunked_loss("fkl", hidden, head, t_hidden, t_head, targets, chunk_size=bad)


@needs_mlx
def test_mixed_frameworks_are_refused():
    data = problem()
    with pytest.raises(TypeError, match="from one framework"):
        hpd.chunked_loss("fkl", torch.tensor(data["hidden"]), mx.array(data["head"].astype("float32")),
                         torch.tensor(data["t_hidden"]), torch.tensor(data["t_head"]),
                         torch.tensor(data["targets"]))


def test_import_hpd_imports_no_framework():
    code = "import sys, hpd; hpd.chunked_loss; assert 'torch' not in sys.modules and 'mlx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_path_reports_the_same_kl():
    import torch

    torch.manual_seed(1)
    hs, ht = torch.randn(2, 6, 8), torch.randn(2, 6, 12)
    ws, wt = torch.randn(13, 8), torch.randn(13, 12)
    y = torch.randint(0, 13, (2, 6))
    sampled = torch.randint(0, 13, (2, 6))
    _, chunked = hpd.chunked_loss("hpd", hs, ws, ht, wt, y, chunk_size=4, sampled=sampled)
    _, plain = hpd.loss("hpd", hs @ ws.T, ht @ wt.T, y, sampled=sampled)
    assert chunked["kl"] == pytest.approx(plain["kl"], rel=1e-5)
