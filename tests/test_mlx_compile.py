"""The compiled mlx step (--compile on) against the uncompiled one.

Same rows, same keyed samples: losses per step within 1e-5 relative, every metric
within 1e-5 (relative, or absolute near 0), weights within 1e-5 after the run (seen:
~2e-6; the compiled graph fuses and reorders float32 sums).
The first compiled call builds kernels (g++ on Linux CPU: tens of seconds, cold cache).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pip install 'hpd-distill[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pip install 'hpd-distill[mlx]')")

from hpd.backends.mlx.compiled import bucket, fits  # noqa: E402

import hpd  # noqa: E402
from hpd.objectives.teacher import LogitsTeacher  # noqa: E402

pytestmark = pytest.mark.mlx


def test_buckets_are_few_and_tight():
    sizes = {bucket(n) for n in range(1, 1025)}
    assert len(sizes) <= 30
    for n in range(1, 1025):
        assert n <= bucket(n) <= max(16, 1.25 * n + 1)


def test_large_batches_take_the_chunked_path():
    class Loss:
        teacher = LogitsTeacher(mx.zeros((1, 1, 4)))
        chunk_budget_mb = 64

    assert fits(Loss, 64, 32000)
    assert not fits(Loss, 8192, 152000)  # 8192 x 152k x 4 B x 6 buffers is ~28 GiB
    Loss.teacher = object()  # an offline store: its rows come from the host
    assert not fits(Loss, 16, 100)


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_compiled_equals_uncompiled(assets, tmp_path, packing):
    from mlx.utils import tree_flatten

    runs = {}
    for mode in ("off", "on"):
        runs[mode] = hpd.distill(dict(
            teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
            out=str(tmp_path / mode), backend="mlx", steps=3, batch_size=4, max_length=48, lr=3e-3,
            progress=False, compile=mode, packing=packing, method="hpd",
            schedule={"phases": [{"objectives": {"hpd": 1.0, "sft": 0.1}}]}))
    a, b = steps(tmp_path / "off"), steps(tmp_path / "on")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        assert ra["hpd/sample_differs"] > 0.2
        for key, value in ra.items():
            if isinstance(value, float) and key not in ("tokens_per_s",):
                assert rb[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    wa = {k: np.array(v) for k, v in tree_flatten(runs["off"]["student"].parameters())}
    wb = {k: np.array(v) for k, v in tree_flatten(runs["on"]["student"].parameters())}
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-5
