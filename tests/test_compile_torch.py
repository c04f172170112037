"""--compile on the torch backend (backends/torch/compiled.py): compiled steps equal
uncompiled ones, and lengths padded to buckets bound the graphs compiled.

Compiling on CPU runs a C++ compiler: about a minute here with a cold inductor cache, a
few seconds with a warm one; so the test is marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hpd.backends.torch import compiled  # noqa: E402
from hpd.backends.torch.backend import TorchBackend  # noqa: E402
from hpd.train.config import DistillConfig  # noqa: E402
from hpd.data.examples import Example  # noqa: E402
from hpd.data.batches import collate  # noqa: E402
from hpd.train.loop import objective_loss_fn  # noqa: E402
from hpd.train.schedule_config import Objective  # noqa: E402


class Cfg:
    device = "cpu"
    compile = "off"
    compile_buckets = "16"
    max_length = 64
    gradient_checkpointing = False


def models():
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed, hidden, layers):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=128, use_cache=False))

    return build(2, 32, 1).train(), build(1, 48, 2).eval().requires_grad_(False)


def batch(length, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(3):  # rows of unequal length: right padding inside the batch too
        n = length - 2 * i
        rows.append(Example(rng.integers(3, 96, size=n).tolist(), [j >= 4 for j in range(n)], 4))
    return collate(rows, 0)


def steps(mode, chunked, batches, method="jsd", params=None):
    """(loss, gradients) of each batch's student step, and the backend."""
    Cfg.compile = mode
    backend = TorchBackend(Cfg())
    student, teacher = models()
    out = []
    for mb in batches:
        arrays = backend.to_arrays(mb)
        t = backend.forward(teacher, arrays, hidden=chunked)
        loss_fn = objective_loss_fn([Objective(method, 1.0, params or {"beta": 0.5})], t, arrays["targets"],
                                    sampled=None, num_tokens=float((mb["targets"] != -100).sum()), temperature=1.0,
                                    chunk_size=16, chunk_fn=backend.chunk_fn)
        value, _ = backend.forward_backward(student, arrays, loss_fn, hidden=chunked)
        out.append((value, {k: p.grad.clone() for k, p in student.named_parameters()}))
        student.zero_grad(set_to_none=True)
    return out, backend


@pytest.mark.slow
def test_compiled_equals_uncompiled_and_buckets_bound_the_graphs():
    batches = [batch(20, 0), batch(27, 1), batch(40, 2), batch(21, 3)]  # buckets 32, 32, 48, 32
    try:
        ref, _ = steps("off", True, batches)
        got, backend = steps("on", True, batches)
    finally:
        Cfg.compile = "off"
    for (v1, g1), (v2, g2) in zip(ref, got):
        assert abs(v1 - v2) <= 1e-5 * max(1.0, abs(v1))
        for k in g1:
            assert float((g1[k] - g2[k]).abs().max()) <= 1e-5, k
    stats = backend.compiler.stats()
    # one graph per model and bucket (32 and 48), whatever the lengths inside a bucket;
    # the loss's chunk function has a dynamic number of positions
    assert stats["graphs/student"] == 2 and stats["graphs/teacher"] == 2
    assert stats["graphs/loss"] <= 3
    assert backend.step_metrics() == {"compile/graphs": stats["graphs"]}


def test_buckets():
    assert [compiled.bucket(n, "64") for n in (1, 64, 65, 130)] == [64, 64, 128, 192]
    assert [compiled.bucket(n, "pow2") for n in (1, 17, 64, 65, 1025)] == [16, 32, 64, 128, 2048]
    inputs = {"input_ids": torch.ones((2, 5), dtype=torch.long), "attention_mask": torch.ones((2, 5))}
    padded = compiled.pad_to(inputs, 8)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"][:, 5:].sum() == 0


def test_auto_is_off_on_cpu_and_the_option_is_checked():
    assert not compiled.enabled("auto", torch.device("cpu"))
    assert compiled.enabled("auto", torch.device("cuda")) and compiled.enabled("on", torch.device("cpu"))
    cfg = DistillConfig.from_dict({"compile_buckets": "48"})
    cfg.validate(require_paths=False)
    with pytest.raises(ValueError, match="compile_buckets"):
        DistillConfig.from_dict({"compile_buckets": "often"}).validate(require_paths=False)
    Cfg.compile = "off"
    assert TorchBackend(Cfg()).compiler is None


def test_yaml_on_and_off_are_the_choices():
    cfg = DistillConfig.from_dict({"compile": True, "chunked": False})  # a recipe's `compile: on`, `chunked: off`
    assert (cfg.compile, cfg.chunked) == ("on", "off")
    cfg.validate(require_paths=False)


class _Refuses:
    """Stands in for torch.compile where the backend cannot generate a graph (as Inductor could
    not for the chunked loss's vocabulary-wide cumulative sum with torch 2.11 on an H200)."""

    def __init__(self, fn, **kw):
        self.fn = fn

    def __call__(self, *a, **kw):
        if getattr(self.fn, "__name__", "") == "chunk_terms":
            raise RuntimeError("InductorError: no code for this graph")
        return self.fn(*a, **kw)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_chunked_loss_that_fails_to_compile_runs_uncompiled_under_auto(monkeypatch, capsys, mode):
    """auto: the step goes on uncompiled, equal to --compile off, and says so once; on: the
    failure is the run's error."""
    batches = [batch(20, 0), batch(27, 1)]
    monkeypatch.setattr(compiled, "enabled", lambda m, device: m in ("auto", "on"))  # as on CUDA
    try:
        ref, _ = steps("off", True, batches)
        monkeypatch.setattr(torch, "compile", _Refuses)
        if mode == "on":
            with pytest.raises(RuntimeError, match="no code for this graph"):
                steps(mode, True, batches)
            return
        got, _ = steps(mode, True, batches)
    finally:
        Cfg.compile = "off"
    for (v1, g1), (v2, g2) in zip(ref, got):  # the forwards still see bucket-padded lengths
        assert abs(v1 - v2) <= 1e-5 * max(1.0, abs(v1))
        assert all(torch.allclose(g1[k], g2[k], rtol=1e-5, atol=1e-6) for k in g1)
    assert capsys.readouterr().err.count("torch.compile failed for the chunked loss") == 1
