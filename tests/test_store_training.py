"""Losses and gradients from a teacher store against the live teacher, every method, both backends.

At k = V with float32 log-probs (--logprob-bits 32) the store holds the teacher's rows
exactly, so the loss and the gradients must agree to float32 rounding: relative 1e-5 for
the loss, 1e-4 of the largest gradient entry. With 16-bit codes each log-prob is off by
at most 3.05e-4 nats, which moves the loss and gradients by about as much relatively;
checked at 2e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
from chunked_grads import loss_and_grads

from hpd.teachers.store import Store
from hpd.teachers.stored import StoreTeacher, batch_rows, reconstruct

METHODS = ["sft", "fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "akl", "todi", "hpd"]


def _store(assets, folder, backend="torch", **kw):
    from hpd.backends import get_backend
    from hpd.teachers.cache import CacheOptions, cache_teacher

    if not (folder / "index.json").exists():
        be = get_backend(backend)
        teacher = be.load_model(str(assets["teacher"]), trainable=False, dtype="float32")
        tok = be.load_tokenizer(str(assets["teacher"]))
        settings = dict(top_k=be.vocab_size(teacher), max_length=64, batch_size=16, examples_per_shard=32,
                        logprob_bits=32, progress=False)
        settings.update(kw)
        cache_teacher(be, teacher, tok, str(assets["data"]), folder, CacheOptions(**settings),
                      teacher_name=str(assets["teacher"]))
    return Store(folder)


@pytest.fixture(scope="module")
def stores(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {"full": _store(assets, root / "full"), "full16": _store(assets, root / "full16", logprob_bits=16),
            "top8": _store(assets, root / "top8", top_k=8, logprob_bits=16)}


def _batch(assets, backend):
    from hpd.data.batches import Batches, load_dataset
    from hpd.data.examples import pad_id_of

    tok = backend.load_tokenizer(str(assets["teacher"]))
    data = load_dataset(assets["data"], tok, 64)
    return next(Batches(data, 6, pad_id_of(tok), seed=3))


def _case(assets, backend_name):
    """(backend, batch, arrays, teacher Outputs, student hidden, student head weight, samples)."""
    from hpd.backends import get_backend

    be = get_backend(backend_name)
    teacher = be.load_model(str(assets["teacher"]), trainable=False, dtype="float32")
    student = be.load_model(str(assets["student"]), trainable=True, dtype="float32")
    batch = _batch(assets, be)
    arrays = be.to_arrays(batch)
    t_out = be.forward(teacher, arrays, hidden=True)
    s_out = be.forward(student, arrays, hidden=True)
    head = getattr(s_out.head, "weight", s_out.head)
    rng = np.random.default_rng(0)
    sampled = be.to_arrays({"s": rng.integers(0, head.shape[0], size=batch["targets"].shape)})["s"]
    return be, batch, arrays, t_out, s_out.hidden, head, sampled


def _compare(backend_name, assets, store, methods, tol_loss, tol_grad):
    from hpd.objectives.teacher import LiveTeacher

    be, batch, arrays, t_out, hidden, head, sampled = _case(assets, backend_name)
    live = LiveTeacher(t_out.hidden, t_out.head)
    cached = StoreTeacher(be.to_arrays(batch_rows(store, batch)), vocab=store.vocab, temperature=1.0)
    for method in methods:
        a = loss_and_grads(backend_name, method, hidden, head, arrays["targets"], live, sampled, chunk_size=13)
        b = loss_and_grads(backend_name, method, hidden, head, arrays["targets"], cached, sampled, chunk_size=13)
        assert np.isfinite(a[0]) and abs(a[0] - b[0]) <= tol_loss * max(abs(a[0]), 1e-3), (method, a[0], b[0])
        for ga, gb in zip(a[1:], b[1:]):
            scale = np.abs(ga).max()
            assert scale > 0 and np.abs(ga - gb).max() <= tol_grad * scale, (method, np.abs(ga - gb).max(), scale)


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_full_store_equals_the_live_teacher_for_every_method(assets, stores, backend_name):
    if backend_name == "mlx":
        pytest.importorskip("mlx.core")
    _compare(backend_name, assets, stores["full"], METHODS, 1e-5, 1e-4)


def test_quantized_full_store_within_its_bound(assets, stores):
    _compare("torch", assets, stores["full16"], ["fkl", "rkl", "hpd"], 2e-3, 2e-3)


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_top_k_store_runs_every_method(assets, stores, backend_name):
    """At k = 8 the rows are an approximation; every method still runs and stays close."""
    if backend_name == "mlx":
        pytest.importorskip("mlx.core")
    from hpd.objectives.teacher import LiveTeacher

    be, batch, arrays, t_out, hidden, head, sampled = _case(assets, backend_name)
    store = stores["top8"]
    cached = StoreTeacher(be.to_arrays(batch_rows(store, batch)), vocab=store.vocab, temperature=1.0)
    live = LiveTeacher(t_out.hidden, t_out.head)
    for method in METHODS:
        a = loss_and_grads(backend_name, method, hidden, head, arrays["targets"], live, sampled, chunk_size=13)
        b = loss_and_grads(backend_name, method, hidden, head, arrays["targets"], cached, sampled, chunk_size=13)
        assert np.isfinite(b[0]) and all(np.isfinite(g).all() for g in b[1:]), method
        if method == "sft":  # no teacher in the loss: identical
            assert a[0] == pytest.approx(b[0], rel=1e-6)


def test_rows_follow_the_chunked_paths_order(assets, stores):
    """The stored rows land on the batch's flat positions: at k = V, the reconstructed row
    at every target position is the live teacher's log-softmax there."""
    import torch

    from hpd.backends import get_backend
    from hpd.objectives.ops import ops_for

    be = get_backend("torch")
    teacher = be.load_model(str(assets["teacher"]), trainable=False, dtype="float32")
    batch = _batch(assets, be)
    arrays = be.to_arrays(batch)
    logits = teacher(input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"]).logits.detach()
    lp = torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
    store = stores["full"]
    cached = StoreTeacher(be.to_arrays(batch_rows(store, batch)), vocab=store.vocab, temperature=1.0)
    flat = torch.from_numpy(np.flatnonzero(batch["targets"].reshape(-1) != -100))
    o = ops_for(lp)
    rows = cached.select(o, flat).log_probs(o, slice(0, len(flat)), store.vocab, 1.0, torch.float32)
    assert torch.allclose(rows, lp[flat], atol=2e-5)


def test_reconstruct_sums_to_one_and_keeps_the_data_token(assets):
    """Alone, on arrays: k < V, the data token inside and outside the top k, a shorter
    shared vocabulary."""
    import torch

    from hpd.objectives.ops import ops_for

    rng = np.random.default_rng(4)
    z = rng.normal(size=(9, 40)) * 3
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    y = np.array([int(np.argmax(r)) for r in lp[:4]] + list(rng.integers(0, 40, size=5)))
    for k in (1, 5, 40):
        ids = np.argsort(-lp, axis=1)[:, :k]
        top = np.take_along_axis(lp, ids, 1)
        rest = np.maximum(1 - np.exp(top).sum(1), 0)
        args = [torch.from_numpy(np.asarray(a)) for a in
                (ids, top.astype(np.float32), y, lp[np.arange(9), y].astype(np.float32), rest.astype(np.float32))]
        o = ops_for(args[1])
        row = reconstruct(o, *args, 40).numpy()
        assert np.abs(np.exp(row).sum(1) - 1).max() < 1e-5
        assert np.abs(row[np.arange(9), y] - lp[np.arange(9), y]).max() < 1e-6
        assert np.abs(np.take_along_axis(row, ids, 1) - top).max() < 1e-5
        if k == 40:
            assert np.abs(row - lp).max() < 1e-5
        short = reconstruct(o, *args, 40, 30).numpy()
        assert short.shape == (9, 30) and np.abs(np.exp(short).sum(1) - 1).max() < 1e-5
