"""Sequence packing: a packed micro-batch gives the unpacked one's loss and gradients.

Tolerances (float32): loss 1e-5 relative, gradients 1e-4 relative to each tensor's
largest entry (seen: ~1e-6; packing only reorders the sums).
"""

from __future__ import annotations

import numpy as np
import pytest

import hpd
from hpd.data.batches import collate, load_dataset
from hpd.data.examples import pad_id_of
from hpd.data.packing import block_causal_mask, collate_packed, pack_bins
from hpd.objectives.uniforms import token_keys
from hpd.train.loop import target_count


def test_pack_bins_first_fit_decreasing():
    bins = pack_bins([5, 3, 9, 2, 4], 9)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 9, 2, 4][i] for i in b) <= 9 for b in bins)
    assert bins == [[2], [0, 4], [1, 3]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_bins([10], 9)


def test_packed_layout_keeps_rows_apart(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    ex = load_dataset(assets["data"], tok, 64).examples[:6]
    packed = collate_packed(ex, pad_id_of(tok), rows=[10, 11, 12, 13, 14, 15])
    plain = collate(ex, pad_id_of(tok))
    assert packed["input_ids"].shape[0] < len(ex)
    assert packed["input_ids"].shape[1] <= plain["input_ids"].shape[1]
    # the same targets, keyed by (row, position), in both layouts
    def keyed(batch):
        rows, pos = token_keys(batch)
        t = batch["targets"]
        return sorted((int(r), int(p), int(y)) for r, p, y in zip(rows[t >= 0], pos[t >= 0], t[t >= 0]))
    plain["rows"] = np.arange(10, 16)
    assert keyed(packed) == keyed(plain)
    mask = block_causal_mask(packed["position_ids"])
    rows = packed["token_rows"]
    for b in range(rows.shape[0]):
        real = rows[b] >= 0
        cross = mask[b, 0] & (rows[b][:, None] != rows[b][None, :]) & real[:, None] & real[None, :]
        assert not cross.any()


def _samples(batch, vocab):
    rows, pos = token_keys(batch)
    return ((rows * 31 + pos * 7) % vocab).astype(np.int64)  # the same token for the same (row, position)


def _check(backend, assets, family, method, chunked, grads_of):
    tok = backend.load_tokenizer(str(assets[f"{family}student"]))
    examples = load_dataset(assets["data"], tok, 64).examples[:7]
    rows = list(range(100, 107))
    plain = collate(examples, pad_id_of(tok))
    plain["rows"] = np.asarray(rows)
    packed = collate_packed(examples, pad_id_of(tok), rows=rows)
    assert packed["input_ids"].size < plain["input_ids"].size
    teacher = backend.load_model(str(assets[f"{family}teacher"]), trainable=False, dtype="float32")
    student = backend.load_model(str(assets[f"{family}student"]), trainable=True, dtype="float32")
    vocab = backend.vocab_size(student)
    n = target_count(plain["targets"], vocab)
    assert n == target_count(packed["targets"], vocab)
    results = []
    for batch in (plain, packed):
        arrays = backend.to_arrays({**batch, "s": _samples(batch, vocab)})
        t_out = backend.forward(teacher, arrays, hidden=chunked)
        kw = dict(num_tokens=float(n), sampled=arrays["s"] if method == "hpd" else None)

        def loss_fn(out, t_out=t_out, arrays=arrays, kw=kw):
            if chunked:
                return hpd.chunked_loss(method, out.hidden, out.head, t_out.hidden, t_out.head,
                                        arrays["targets"], chunk_size=16, **kw)
            return hpd.loss(method, out.logits, t_out.logits, arrays["targets"], **kw)

        value, _ = backend.forward_backward(student, arrays, loss_fn, hidden=chunked)
        results.append((value, grads_of(backend, student)))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        scale = max(float(np.abs(g0[k]).max()), 1e-12)
        assert np.abs(g0[k] - g1[k]).max() <= 1e-4 * scale, k


def _torch_grads(backend, model):
    out = {k: p.grad.detach().clone().numpy() for k, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return out


@pytest.mark.parametrize("family", ["", "qwen_"])
@pytest.mark.parametrize("method,chunked", [("fkl", False), ("hpd", False), ("fkl", True), ("hpd", True)])
def test_packed_equals_unpacked_torch(assets, family, method, chunked):
    from hpd.backends.torch import TorchBackend

    _check(TorchBackend(), assets, family, method, chunked, _torch_grads)


def _mlx_grads(backend, model):
    from mlx.utils import tree_flatten

    grads = backend._grads.pop(id(model))
    return {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.mlx
@pytest.mark.parametrize("family", ["", "qwen_"])
@pytest.mark.parametrize("method,chunked", [("fkl", False), ("hpd", False), ("fkl", True), ("hpd", True)])
def test_packed_equals_unpacked_mlx(assets, family, method, chunked):
    pytest.importorskip("mlx_lm")
    from hpd.backends.mlx import MlxBackend

    _check(MlxBackend(), assets, family, method, chunked, _mlx_grads)


def test_torch_eager_attention_also_keeps_rows_apart(assets):
    from hpd.backends.torch import TorchBackend

    backend = TorchBackend()
    tok = backend.load_tokenizer(str(assets["student"]))
    examples = load_dataset(assets["data"], tok, 64).examples[:7]
    plain, packed = collate(examples, pad_id_of(tok)), collate_packed(examples, pad_id_of(tok))
    model = backend.load_model(str(assets["student"]), trainable=False, dtype="float32")
    model.set_attn_implementation("eager")
    a = backend.forward(model, backend.to_arrays(plain)).logits.numpy()
    b = backend.forward(model, backend.to_arrays(packed)).logits.numpy()
    rows, pos = packed["token_rows"], packed["position_ids"]
    real = rows >= 0
    np.testing.assert_allclose(b[real], a[rows[real], pos[real]], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fkl", "hpd"])
def test_packed_run_equals_unpacked_run(assets, tmp_path, method):
    """Two optimizer steps of `hpd distill` with and without --packing (hpd with samples
    keyed by row and position, so both layouts draw the same ones)."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(assets["tokenizer"]))
    hooks = {"given_samples": lambda batch: _samples(batch, vocab)} if method == "hpd" else {}
    runs = {}
    for packing in (False, True):
        runs[packing] = hpd.distill(dict(
            teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
            out=str(tmp_path / f"p{int(packing)}"), steps=2, batch_size=8, lr=3e-3, progress=False,
            chunked="on", chunk_size=32, method=method, packing=packing), **hooks)
    a, b = runs[False], runs[True]
    assert a["metrics"]["tokens"] == b["metrics"]["tokens"]
    np.testing.assert_allclose(a["metrics"]["loss"], b["metrics"]["loss"], rtol=1e-5)
    wa, wb = a["student"].state_dict(), b["student"].state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


@pytest.mark.slow
def test_packed_rollout_step_equals_unpacked(assets, tmp_path):
    """An on-policy step: the packed batch's prompts are found per row, the student's
    continuations are packed again, and the step equals the unpacked one."""
    runs = {}
    for packing in (False, True):
        runs[packing] = hpd.distill(dict(
            teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
            out=str(tmp_path / f"p{int(packing)}"), steps=1, batch_size=4, lr=3e-3, progress=False,
            method="fkl", packing=packing, rollout_max_new_tokens=8, schedule={"lambda_start": 1.0}))
    a, b = runs[False]["metrics"], runs[True]["metrics"]
    assert a["rollout/tokens"] > 0  # the step trained on student rollouts
    assert a["tokens"] == b["tokens"] and a["rollout/tokens"] == b["rollout/tokens"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
