"""The chunked loss's shared path: heads with logit scaling, soft-capping and quantized
weights, teacher sources, supervised positions only, inverse-CDF samples, auto chunks.

Each is held to the plain path (`hpd.loss` on logits the way the model forms them):
tolerances as in test_chunked.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_chunked import FRAMEWORKS, B, T, assert_same, mx, needs_mlx, problem, tol

import hpd
from hpd.objectives.chunked import CHUNK_BUFFERS, resolve_chunk_size
from hpd.objectives.heads import Head, logit_transform
from hpd.objectives.losses import sample_with_uniforms
from hpd.objectives.ops import ops_for
from hpd.objectives.teacher import LiveTeacher

torch = pytest.importorskip("torch")


def to_numpy(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.array(x)


def head_logits(fw, hidden, weight, scale=1.0, softcap=0.0):
    """Logits as a model of the family forms them."""
    z = (hidden @ weight.T) * scale
    if softcap:
        tanh = torch.tanh if fw.name == "torch" else mx.tanh
        z = softcap * tanh(z / softcap)
    return z


TRANSFORMS = {"cohere": {"scale": 0.0625}, "granite": {"scale": 1 / 8.0}, "gemma2": {"softcap": 2.5},
              "both": {"scale": 3.0, "softcap": 4.0}}


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method", ["fkl", "rkl", "jsd", "hpd"])
@pytest.mark.parametrize("family", list(TRANSFORMS))
def test_scaled_and_softcapped_heads_equal_plain(fw, method, family):
    data = problem(seed=3)
    tf = TRANSFORMS[family]
    t_tf = {"scale": 0.5, "softcap": 3.0}
    t_hidden, t_head = fw.array(data["t_hidden"]), fw.array(data["t_head"])
    targets, sampled = fw.array(data["targets"]), fw.array(data["sampled"])
    kw = {"sampled": sampled, "temperature": 1.3}

    def plain(hidden, head):
        return hpd.loss(method, head_logits(fw, hidden, head, **tf), head_logits(fw, t_hidden, t_head, **t_tf),
                        targets, **kw)

    def chunked(hidden, head):
        return hpd.chunked_loss(method, hidden, Head(weight=head, **tf), t_hidden, Head(weight=t_head, **t_tf),
                                targets, chunk_size=4, **kw)

    results = [fw.value_and_grads(fn, data["hidden"], data["head"]) for fn in (plain, chunked)]
    assert_same(*results, "float64", fw)


def test_logit_transform_reads_family_configs():
    assert logit_transform({"logit_scale": 0.0625}) == {"scale": 0.0625, "softcap": 0.0}
    assert logit_transform({"logits_scaling": 8.0}) == {"scale": 0.125, "softcap": 0.0}
    assert logit_transform({"final_logit_softcapping": 30.0, "logit_scale": None}) == {"scale": 1.0, "softcap": 30.0}
    assert logit_transform({}) == {"scale": 1.0, "softcap": 0.0}


@needs_mlx
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("method", ["fkl", "hpd"])
def test_quantized_heads_equal_plain(bits, side, method):
    """A quantized head's chunks come from the quantized matmul: the same values and
    hidden-state gradients as the plain path on the same quantized model's logits."""
    rng = np.random.default_rng(bits)
    V, H = 96, 64
    hidden = rng.normal(size=(B, T, H)).astype(np.float32)
    t_hidden = rng.normal(size=(B, T, H)).astype(np.float32)
    dense = mx.array(rng.normal(size=(V, H)).astype(np.float32))
    w, scales, biases = mx.quantize(mx.array(rng.normal(size=(V, H)).astype(np.float32)), group_size=64, bits=bits)
    qhead = Head(weight=w, scales=scales, biases=biases, group_size=64, bits=bits)

    def qlogits(h):
        return mx.quantized_matmul(h, w, scales, biases, transpose=True, group_size=64, bits=bits)

    data = problem(seed=bits)
    targets, sampled = mx.array(data["targets"]), mx.array(data["sampled"])
    t_h = mx.array(t_hidden)
    if side == "teacher":
        def plain(h):
            return hpd.loss(method, h @ dense.T, qlogits(t_h), targets, sampled=sampled)

        def chunked(h):
            return hpd.chunked_loss(method, h, dense, t_h, qhead, targets, sampled=sampled, chunk_size=7)
    else:
        def plain(h):
            return hpd.loss(method, qlogits(h), t_h @ dense.T, targets, sampled=sampled)

        def chunked(h):
            return hpd.chunked_loss(method, h, qhead, t_h, dense, targets, sampled=sampled, chunk_size=7)

    out = []
    for fn in (plain, chunked):
        found = {}

        def scalar(h):
            value, metrics = fn(h)
            found.update(metrics)
            return value

        value, grad = mx.value_and_grad(scalar)(mx.array(hidden))
        out.append((value.item(), dict(found), np.array(grad)))
    (v1, m1, g1), (v2, m2, g2) = out
    np.testing.assert_allclose(v2, v1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-6)
    assert m1["tokens"] == m2["tokens"] == int((data["targets"] >= 0).sum())


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("method", ["fkl", "tvd", "hpd"])
def test_only_supervised_positions_are_computed(fw, method):
    """Positions that do not count never reach the vocabulary: garbage (NaN, huge)
    hidden states there change nothing, on both paths, and the loss equals the one
    computed on the supervised positions alone."""
    data = problem(seed=5)
    y = data["targets"]
    ignored = y == -100
    poisoned = dict(data)
    poisoned["hidden"] = data["hidden"].copy()
    poisoned["t_hidden"] = data["t_hidden"].copy()
    poisoned["hidden"][ignored] = np.nan
    poisoned["t_hidden"][ignored] = 1e30
    clean = [fw.value_and_grads(lambda h, w: hpd.chunked_loss(
        method, h, w, fw.array(d["t_hidden"]), fw.array(d["t_head"]), fw.array(y),
        sampled=fw.array(d["sampled"]), chunk_size=3), d["hidden"], d["head"]) for d in (data, poisoned)]
    (v1, m1, g1), (v2, m2, g2) = clean
    assert np.isfinite(v2) and v2 == pytest.approx(v1, rel=1e-12)
    np.testing.assert_array_equal(g2[1], g1[1])
    assert np.isfinite(g2[0]).all() and not g2[0][ignored].any()  # no gradient where nothing counts

    # the same loss from the supervised positions alone, as a (1, N) batch
    keep = (y >= 0) & (y < 37)
    alone = fw.value_and_grads(lambda h, w: hpd.chunked_loss(
        method, h, w, fw.array(data["t_hidden"][keep][None]), fw.array(data["t_head"]), fw.array(y[keep][None]),
        sampled=fw.array(data["sampled"][keep][None]), chunk_size=3), data["hidden"][keep][None], data["head"])
    assert alone[0] == pytest.approx(v1, rel=1e-9)
    np.testing.assert_allclose(alone[2][1], g1[1], **tol("float64", fw))


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_plain_path_ignores_what_does_not_count(fw):
    data = problem(seed=6)
    y = data["targets"]
    logits = data["hidden"] @ data["head"].T
    t_logits = data["t_hidden"] @ data["t_head"].T
    poisoned = logits.copy()
    poisoned[y == -100] = np.nan
    values = [fw.value_and_grads(lambda z: hpd.loss("jsd", z, fw.array(t_logits), fw.array(y)), z)[0]
              for z in (logits, poisoned)]
    assert np.isfinite(values[1]) and values[1] == pytest.approx(values[0], rel=1e-12)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_teacher_source_equals_teacher_arrays(fw):
    data = problem(seed=8)
    source = LiveTeacher(fw.array(data["t_hidden"]), fw.array(data["t_head"]))
    kw = {"sampled": fw.array(data["sampled"]), "chunk_size": 5}
    a = fw.value_and_grads(lambda h, w: hpd.chunked_loss("hpd", h, w, fw.array(data["t_hidden"]),
                                                         fw.array(data["t_head"]), fw.array(data["targets"]), **kw),
                           data["hidden"], data["head"])
    b = fw.value_and_grads(lambda h, w: hpd.chunked_loss("hpd", h, w, targets=fw.array(data["targets"]),
                                                         teacher=source, **kw), data["hidden"], data["head"])
    assert_same(a, b, "float64", fw)


# ------------------------------------------------------------------ inverse-CDF samples


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_uniform_samples_do_not_depend_on_chunking_or_path(fw):
    data = problem(seed=9)
    u = np.random.default_rng(1).random(size=(B, T))
    common = dict(uniforms=fw.array(u.astype(np.float32)))
    results = [fw.value_and_grads(lambda h, w, c=c: hpd.chunked_loss(
        "hpd", h, w, fw.array(data["t_hidden"]), fw.array(data["t_head"]), fw.array(data["targets"]),
        chunk_size=c, **common), data["hidden"], data["head"]) for c in (1, 4, 26)]
    plain = fw.value_and_grads(lambda h, w: hpd.loss(
        "hpd", h @ w.T, fw.array(data["t_hidden"] @ data["t_head"].T), fw.array(data["targets"]), **common),
        data["hidden"], data["head"])
    for r in results:
        assert_same(plain, r, "float64", fw)


def test_uniform_samples_agree_across_frameworks():
    if mx is None:
        pytest.skip("mlx is not installed")
    rng = np.random.default_rng(2)
    logits = (3 * rng.normal(size=(500, 50))).astype(np.float32)
    u = rng.random(500).astype(np.float32)
    draws = []
    for arr in (torch.tensor, mx.array):
        z = arr(logits)
        o = ops_for(z)
        draws.append(to_numpy(sample_with_uniforms(o, o.log_softmax(z), arr(u))))
    # a draw can differ only where u sits within float32 rounding of a CDF step
    assert (draws[0] != draws[1]).mean() < 0.01


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_uniform_samples_follow_the_softmax(fw):
    """Chi-square goodness of fit of 40k inverse-CDF draws against the softmax (df = 11;
    the 0.999 quantile is 31.3), with a token of probability zero that must never come."""
    rng = np.random.default_rng(3)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.7, 0.1, 1.1, -np.inf], dtype=np.float32)
    n = 40_000
    z = fw.array(np.tile(logits, (n, 1)))
    o = ops_for(z)
    draws = to_numpy(sample_with_uniforms(o, o.log_softmax(z), fw.array(rng.random(n).astype(np.float32))))
    p = np.exp(logits - logits[np.isfinite(logits)].max())
    p /= p.sum()
    counts = np.bincount(draws, minlength=len(logits))
    assert counts[-1] == 0
    expected = n * p[:-1]
    chi2 = float(((counts[:-1] - expected) ** 2 / expected).sum())
    assert chi2 < 31.3


# ------------------------------------------------------------------ chunks sized by bytes


def test_auto_chunk_size_follows_the_budget():
    assert resolve_chunk_size("auto", 65536, 4, 256) == 256 * 2**20 // (CHUNK_BUFFERS * 65536 * 4)
    assert resolve_chunk_size("auto", 152064, 4, 256) < resolve_chunk_size("auto", 32000, 4, 256)
    assert resolve_chunk_size("auto", 10**9, 4, 1) == 16  # never below 16 positions
    assert resolve_chunk_size("7", 100) == 7 and resolve_chunk_size(9, 100) == 9
    for bad in ("many", 0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            resolve_chunk_size(bad, 100)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_auto_chunks_equal_fixed_chunks(fw):
    data = problem(seed=11)
    runs = []
    for kw in ({"chunk_size": "auto", "chunk_budget_mb": 0.004}, {"chunk_size": "auto"}, {"chunk_size": 5}):
        runs.append(fw.value_and_grads(lambda h, w, kw=kw: hpd.chunked_loss(
            "jsd", h, w, fw.array(data["t_hidden"]), fw.array(data["t_head"]), fw.array(data["targets"]), **kw),
            data["hidden"], data["head"]))
    assert resolve_chunk_size("auto", 37, 8, 0.004) < B * T  # the small budget really splits the batch
    for r in runs[1:]:
        assert_same(runs[0], r, "float64", fw)
