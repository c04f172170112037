"""Counter-based uniforms: a pure function of (seed, step, row, position)."""

from __future__ import annotations

import numpy as np

from hpd.data.batches import Batches
from hpd.data.examples import Dataset, Example
from hpd.objectives.uniforms import batch_uniforms, keyed_uniforms


def test_range_and_exact_float32():
    u = keyed_uniforms(0, 0, np.arange(1000)[:, None], np.arange(100)[None, :])
    assert u.dtype == np.float32 and u.shape == (1000, 100)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.all(u * 2**24 == np.round(u * 2**24))  # multiples of 2**-24


def test_uniform_distribution():
    """Kolmogorov-Smirnov distance of 100k draws from U(0, 1) (critical value at 1e-3:
    1.95 / sqrt(n) = 0.0062), and no correlation between neighbouring positions or rows."""
    u = keyed_uniforms(7, 3, np.arange(1000)[:, None], np.arange(100)[None, :]).astype(np.float64)
    x = np.sort(u.ravel())
    n = x.size
    ks = max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))
    assert ks < 1.95 / np.sqrt(n)
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.02


def test_every_key_matters():
    base = keyed_uniforms(1, 2, 3, np.arange(64))
    for other in (keyed_uniforms(2, 2, 3, np.arange(64)), keyed_uniforms(1, 3, 3, np.arange(64)),
                  keyed_uniforms(1, 2, 4, np.arange(64))):
        assert np.mean(base == other) < 0.1
    assert np.array_equal(base, keyed_uniforms(1, 2, 3, np.arange(64)))


def _dataset(n=32):
    return Dataset("mem", [Example(list(range(2, 5 + i % 7)), [False] + [True] * (2 + i % 7), 1)
                           for i in range(n)])


def test_same_uniforms_whatever_the_split():
    """1 process x batch 8, 2 processes x batch 4 and micro-batches of 1: each row gets the
    same uniforms at each position."""
    def draws(batch_size, world, accum):
        out = {}
        for rank in range(world):
            it = Batches(_dataset(), batch_size, 0, seed=3, rank=rank, world_size=world)
            for step in range(2):
                for _ in range(accum):
                    mb = next(it)
                    u = batch_uniforms(5, step, mb)
                    for i, r in enumerate(mb["rows"]):
                        out[(step, int(r))] = u[i, mb["targets"][i] >= 0].tolist()
        return out

    one = draws(8, 1, 1)
    assert one == draws(4, 2, 1) == draws(1, 1, 8)
    assert len(one) == 16


def test_packed_and_plain_batches_draw_alike():
    plain = Batches(_dataset(), 8, 0, seed=1)
    packed = Batches(_dataset(), 8, 0, seed=1, packing=True)
    a, b = next(plain), next(packed)
    ua, ub = batch_uniforms(0, 0, a), batch_uniforms(0, 0, b)
    assert sorted(ua[a["targets"] >= 0].tolist()) == sorted(ub[b["targets"] >= 0].tolist())
