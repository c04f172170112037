"""hpd's per-position student samples do not depend on how a step's rows are split.

The samples are drawn by inverse CDF from uniforms keyed by (seed, step, global row,
position) (hpd.objectives.uniforms), so with sampling on:
- batch 8 x accumulation 1 equals batch 1 x accumulation 8 (torch and mlx, in process);
- 2 processes x batch 4 equal 1 process x batch 8 under torchrun (DDP and FSDP2) and
  under mlx.launch, after 6 steps;
- given equal logits, torch and mlx draw the same tokens;
- the draws follow the softmax (chi-square test).

Batch 8 vs 8 micro-batches of 1 discriminates on mlx (its random keys split per call);
torch's CPU generator happens to fill one stream in order, so there only the
multi-process tests (seed + rank per process) would fail without keyed uniforms.

Tolerances (float32): loss per step 1e-5 relative, weights 1e-5 absolute after the run
(seen: ~1e-7 for accumulation; AdamW moves every weight by about lr = 3e-3 per step, so
one differing sample would show as ~1e-3). Each run also checks that samples were
drawn and differ from the data token, so the comparison is not vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest

import hpd
from hpd.objectives.losses import sample_with_uniforms
from hpd.objectives.ops import ops_for
from hpd.objectives.uniforms import keyed_uniforms

STEPS = 6


def config(assets, out, **kw) -> dict:
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), steps=STEPS, lr=3e-3, warmup_ratio=0.0, progress=False, seed=0, method="hpd",
               max_length=48)
    cfg.update(kw)
    return cfg


def state_of(result) -> dict[str, np.ndarray]:
    student = result["student"]
    if hasattr(student, "state_dict"):
        return {k: v.detach().cpu().numpy().copy() for k, v in student.state_dict().items()}
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(student.parameters())}


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert diff < atol, diff
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=pytest.mark.mlx)])
@pytest.mark.parametrize("chunked", ["on", "off"])
def test_hpd_accumulation_invariance(assets, tmp_path, backend, chunked):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    runs = {}
    for batch, accum in [(8, 1), (1, 8), (2, 4)]:
        runs[(batch, accum)] = hpd.distill(config(assets, tmp_path / f"{batch}x{accum}", backend=backend,
                                                  batch_size=batch, grad_accum=accum, chunked=chunked, steps=3))
    big = runs[(8, 1)]
    assert big["metrics"]["hpd/sample_differs"] > 0.2, "samples were drawn and differ from the data"
    for key, run in runs.items():
        assert run["metrics"]["tokens"] == big["metrics"]["tokens"]
        np.testing.assert_allclose(run["metrics"]["loss"], big["metrics"]["loss"], rtol=1e-5)
        np.testing.assert_allclose(run["metrics"]["hpd/sample_differs"], big["metrics"]["hpd/sample_differs"],
                                   rtol=1e-6)
        assert_same(state_of(big), state_of(run))


def test_torch_and_mlx_draw_alike():
    """Equal log-probs and equal uniforms give equal tokens on both frameworks."""
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(512, 300)) * 3).astype(np.float32)
    u = keyed_uniforms(0, 1, np.arange(512), 0)
    drawn = []
    for array in (torch.from_numpy, mx.array):
        x = array(logits)
        o = ops_for(x)
        s = sample_with_uniforms(o, o.log_softmax(x), array(u))
        drawn.append(np.asarray(s.tolist()))
    assert np.array_equal(drawn[0], drawn[1])


@pytest.mark.parametrize("framework", ["torch", pytest.param("mlx", marks=pytest.mark.mlx)])
def test_draws_follow_the_softmax(framework):
    """200,000 keyed draws from one 12-token softmax: Pearson's chi-square with 11 degrees of
    freedom stays below 31.26, the 0.001 critical value (fixed seed: the test is
    deterministic; a sampler off by a token or a skewed uniform gives thousands)."""
    n, probs = 200_000, np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.006, 0.004])
    if framework == "torch":
        torch = pytest.importorskip("torch")
        array = torch.from_numpy
    else:
        mx = pytest.importorskip("mlx.core")
        array = mx.array
    log_probs = np.log(np.broadcast_to(probs, (n, probs.size))).astype(np.float32)
    u = keyed_uniforms(1234, 0, np.arange(n), 0)
    x = array(np.ascontiguousarray(log_probs))
    o = ops_for(x)
    s = np.asarray(sample_with_uniforms(o, o.log_softmax(x), array(u)).tolist())
    counts = np.bincount(s, minlength=probs.size)
    expected = n * probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 31.26, (chi2, counts)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,chunked,packing", [("ddp", "off", False), ("fsdp", "on", False),
                                                     ("fsdp", "on", True)])
def test_hpd_two_torch_processes_equal_one(assets, tmp_path, parallel, chunked, packing):
    """torchrun, 2 ranks x batch 4 against 1 process x batch 8, hpd with sampling on (and
    with packed rows: each rank packs its own 4). (Before keyed uniforms, each rank drew
    from its own stream: 6e-3 apart after 6 steps.)"""
    pytest.importorskip("torch")
    from test_distributed_torch import assert_same_run, common, steps_of, torchrun

    kw = dict(method="hpd", steps=STEPS, chunked=chunked, max_grad_norm=1.0, packing=packing)
    torchrun(common(assets, tmp_path / "two", batch_size=4, parallel=parallel, **kw))
    hpd.distill(common(assets, tmp_path / "one", batch_size=8, **kw))
    assert all(r["hpd/sample_differs"] > 0.2 for r in steps_of(tmp_path / "one"))
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.mlx
def test_hpd_two_mlx_processes_equal_one(assets, tmp_path):
    """mlx.launch, 2 ranks x batch 4 against 1 rank x batch 8, hpd with sampling on."""
    pytest.importorskip("mlx_lm")
    import sys

    import test_mlx_distributed as md

    if md.launcher() is None:
        pytest.skip("mlx.launch is not installed with this mlx")
    kw = dict(method="hpd", steps=STEPS, lr=3e-3, chunked="off")
    single = md.one_rank(assets, tmp_path / "one", batch_size=8, **kw)
    assert single["metrics"]["hpd/sample_differs"] > 0.2
    cfg = md.base_config(assets, batch_size=4, **kw)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "progress"]
    done = md.launch(2, [sys.executable, "-m", "hpd.cli.main", "distill", *flags, f"--out={tmp_path / 'two'}",
                         "--no-progress"], tmp_path)
    if done.returncode != 0 and "all_sum" not in done.stderr and "Traceback" not in done.stderr:
        pytest.skip(f"mlx.launch could not start 2 ring ranks here: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = md.metrics(tmp_path / "one"), md.metrics(tmp_path / "two")
    for ra, rb in zip(a, b):
        assert rb["tokens"] == ra["tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert_same(md.weights(tmp_path / "one"), md.weights(tmp_path / "two"))
