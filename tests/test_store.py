"""The teacher store: encodings, round trip against the live teacher, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpd.teachers.store import (
    Quantizer,
    Store,
    StoreError,
    bytes_per_position,
    default_bits,
    id_bytes,
    pack12,
    pack_ids,
    unpack12,
    unpack_ids,
)

VENV_BIN = Path(sys.executable).parent


@pytest.mark.parametrize("vocab,nbytes", [(320, 2), (65536, 2), (65537, 3), (152064, 3), (1 << 24, 3),
                                          ((1 << 24) + 1, 4)])
def test_ids_round_trip_in_the_fewest_bytes(vocab, nbytes):
    assert id_bytes(vocab) == nbytes
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(7, 5))
    ids[0, 0] = vocab - 1
    packed = pack_ids(ids, nbytes)
    assert packed.nbytes == ids.size * nbytes
    assert np.array_equal(unpack_ids(packed, nbytes), ids)


@pytest.mark.parametrize("k", [1, 7, 32])
def test_twelve_bit_codes_round_trip(k):
    codes = np.random.default_rng(k).integers(0, 4096, size=(5, k)).astype(np.uint16)
    packed = pack12(codes)
    assert packed.dtype == np.uint8 and packed.shape == (5, 3 * -(-k // 2))
    assert np.array_equal(unpack12(packed, k), codes)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_quantized_logprobs_within_the_stated_bound(bits):
    q = Quantizer(bits)
    rng = np.random.default_rng(1)
    lp = np.sort(-np.abs(rng.normal(0, q.span / 2, size=(50, 32))), axis=1)[:, ::-1].astype(np.float32)
    top, codes = q.encode(lp)
    back = q.decode(top, codes, 32)
    inside = (lp.max(axis=1, keepdims=True) - lp) <= q.span
    assert inside.mean() > 0.5 and (~inside).any()  # both regimes are exercised
    err = np.abs(back - lp)[inside]
    assert err.max() <= q.bound + 1e-5
    assert err.max() > q.bound / 4  # the bound is tight, not a loose figure
    # beyond the span a value is clipped to max - span: never below the truth
    assert np.all(back[~inside] >= lp[~inside])
    assert q.bound == pytest.approx({8: 0.0314, 12: 3.91e-3, 16: 3.05e-4}[bits], rel=1e-2)


def test_bytes_per_position_meets_the_goal():
    for vocab in (32000, 65536, 128256, 152064):  # Llama 2, ..., Llama 3, Qwen 2.5
        assert bytes_per_position(32, vocab, default_bits(vocab)) <= 160
    assert bytes_per_position(32, 32000, 16) == 140
    assert bytes_per_position(32, 152064, 12) == 156
    assert bytes_per_position(32, 152064, 16) == 172
    assert bytes_per_position(32, 152064, 8) == 140


# ----------------------------------------------------------------------------- with a teacher


def _load(backend_name, folder):
    from hpd.backends import get_backend

    be = get_backend(backend_name)
    return be, be.load_model(str(folder), trainable=False, dtype="float32"), be.load_tokenizer(str(folder))


def _write(assets, out, backend_name="torch", **kw):
    from hpd.teachers.cache import CacheOptions, cache_teacher

    be, model, tok = _load(backend_name, assets["teacher"])
    after_shard = kw.pop("after_shard", None)
    settings = dict(top_k=16, max_length=64, batch_size=8, examples_per_shard=16, progress=False)
    settings.update(kw)
    return cache_teacher(be, model, tok, str(assets["data"]), out, CacheOptions(**settings),
                         teacher_name=str(assets["teacher"]), after_shard=after_shard)


def _live_logprobs(assets, examples):
    """The teacher's float64 log-softmax at every target position of `examples`, row-major."""
    import torch

    from hpd.data.batches import collate
    from hpd.data.examples import IGNORE_INDEX

    be, model, tok = _load("torch", assets["teacher"])
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(batch["input_ids"]),
                       attention_mask=torch.from_numpy(batch["attention_mask"])).logits.double()
    lp = torch.log_softmax(logits, -1).numpy()
    keep = batch["targets"] != IGNORE_INDEX
    return lp[keep], batch["targets"][keep]


def test_round_trip_against_the_live_teacher(assets, tmp_path):
    """ids exact, top-k log-probs within the stated bound, the data token's log-prob exact
    (to float32), rest mass = 1 - top-k mass."""
    from hpd.data.batches import load_dataset
    from hpd.backends import get_backend

    _write(assets, tmp_path / "store")
    store = Store(tmp_path / "store")
    tok = get_backend("torch").load_tokenizer(str(assets["teacher"]))
    data = load_dataset(assets["data"], tok, 64)
    assert store.index["examples"] == len(data) and len(store.index["shards"]) == -(-len(data) // 16)
    for i in (0, 17, len(data) - 1):
        lp, y = _live_logprobs(assets, [data.examples[i]])
        got = store.example(i)
        order = np.argsort(-lp, axis=1)[:, :16]
        assert np.array_equal(got["ids"], order)
        true_top = np.take_along_axis(lp, order, 1)
        assert np.abs(got["logprobs"] - true_top).max() <= store.quantizer.bound + 1e-5
        assert np.abs(got["data_logprob"] - lp[np.arange(len(y)), y]).max() <= 2e-6
        rest = 1.0 - np.exp(true_top).sum(1)
        assert np.abs(got["rest_mass"] - rest).max() <= 1e-6


def test_mlx_writes_the_store_torch_writes(assets, tmp_path):
    pytest.importorskip("mlx.core")
    _write(assets, tmp_path / "t", "torch")
    _write(assets, tmp_path / "m", "mlx")
    a, b = Store(tmp_path / "t"), Store(tmp_path / "m")
    assert a.provenance["tokens_sha256"] == b.provenance["tokens_sha256"]
    assert a.provenance["tokenizer_vocab_sha256"] == b.provenance["tokenizer_vocab_sha256"]
    for i in (0, 30, 63):
        x, y = a.example(i), b.example(i)
        assert np.array_equal(x["ids"][:, :4], y["ids"][:, :4])  # deep in the tail, near-ties may swap
        assert np.abs(x["logprobs"] - y["logprobs"]).max() < 2 * a.quantizer.bound + 1e-4
        assert np.abs(x["data_logprob"] - y["data_logprob"]).max() < 1e-4


def test_large_vocabulary_store(assets, tmp_path):
    """A teacher with 70000 rows: 3-byte ids and 12-bit codes (the defaults there), 156
    bytes/position at k = 32 plus per-shard overhead; ids exact, log-probs within the bound."""
    from conftest import build_model

    from hpd.data.batches import load_dataset
    from hpd.backends import get_backend
    from hpd.teachers.cache import CacheOptions, cache_teacher

    folder = build_model(tmp_path / "big", assets["tokenizer"], hidden=16, layers=1, vocab=70000, seed=5)
    be, model, tok = _load("torch", folder)
    cache_teacher(be, model, tok, str(assets["data"]), tmp_path / "s",
                  CacheOptions(top_k=32, max_length=64, batch_size=16, examples_per_shard=64, progress=False),
                  teacher_name=str(folder))
    store = Store(tmp_path / "s")
    assert store.index["id_bytes"] == 3 and store.index["logprob_bits"] == 12
    assert store.index["bytes_per_position"] == 156
    assert store.bytes_on_disk() / store.index["positions"] < 160
    import torch

    from hpd.data.batches import collate

    data = load_dataset(assets["data"], get_backend("torch").load_tokenizer(str(folder)), 64)
    batch = collate([data.examples[3]], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(batch["input_ids"])).logits.double()
    lp = torch.log_softmax(logits, -1).numpy()[batch["targets"] != -100]
    got = store.example(3)
    order = np.argsort(-lp, axis=1)[:, :32]
    assert got["ids"].max() > 65535 and np.array_equal(got["ids"], order)
    assert np.abs(got["logprobs"] - np.take_along_axis(lp, order, 1)).max() <= store.quantizer.bound + 1e-5


class Killed(RuntimeError):
    pass


def test_resume_after_a_kill_writes_the_same_store(assets, tmp_path):
    _write(assets, tmp_path / "whole")

    def kill_after_two(index):
        if len(index["shards"]) == 2:
            raise Killed

    with pytest.raises(Killed):
        _write(assets, tmp_path / "part", after_shard=kill_after_two)
    with pytest.raises(StoreError, match="covers 32 of 64 examples"):
        Store(tmp_path / "part")
    # a shard torn by the kill: a temporary and an unlisted file; neither may be read
    (tmp_path / "part" / "shard-00002.safetensors.tmp").write_bytes(b"torn")
    (tmp_path / "part" / "shard-00002.safetensors").write_bytes(b"torn too")
    with pytest.raises(FileExistsError, match="--resume"):
        _write(assets, tmp_path / "part")
    index = _write(assets, tmp_path / "part", resume=True)
    assert index["complete"] and not list((tmp_path / "part").glob("*.tmp"))
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    assert [s["examples"] for s in index["shards"]] == [s["examples"] for s in whole["shards"]]
    for s in whole["shards"]:
        assert (tmp_path / "part" / s["file"]).read_bytes() == (tmp_path / "whole" / s["file"]).read_bytes()


@pytest.mark.slow
def test_resume_after_sigkill(assets, tmp_path):
    """A real kill of `hpd cache-teacher` between (or inside) shard writes, then --resume."""
    out = tmp_path / "store"
    cmd = [str(VENV_BIN / "hpd"), "cache-teacher", "--teacher", str(assets["teacher"]), "--data",
           str(assets["data"]), "--out", str(out), "--top-k", "8", "--max-length", "64", "--batch-size", "1",
           "--examples-per-shard", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "index.json").read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    if proc.poll() is not None:
        pytest.skip("cache-teacher finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    index = json.loads((out / "index.json").read_text())
    assert not index["complete"]
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    store = Store(out)
    assert store.index["complete"] and store.index["examples"] == 64
    assert [s["examples"][0] for s in store.index["shards"]] == list(range(64))
    _write(assets, tmp_path / "fresh", top_k=8, batch_size=1, examples_per_shard=1)
    other = Store(tmp_path / "fresh")
    for i in range(64):
        a, b = store.example(i), other.example(i)
        assert all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- refusals


def _cli(*args):
    from click.testing import CliRunner
    from hpd.cli.main import cli

    return CliRunner().invoke(cli, ["cache-teacher", *map(str, args)])


def test_refusals_of_cache_teacher(assets, tmp_path):
    base = ["--teacher", assets["teacher"], "--data", assets["data"], "--max-length", 64, "--no-progress"]
    r = _cli(*base, "--out", tmp_path / "a", "--top-k", 100000)
    assert r.exit_code == 2 and "larger than the teacher's vocabulary" in r.output
    assert not (tmp_path / "a").exists()
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = _cli(*base, "--out", foreign, "--top-k", 4)
    assert r.exit_code == 2 and "not empty" in r.output
    r = _cli(*base, "--out", foreign, "--top-k", 4, "--overwrite")
    assert r.exit_code == 2 and "did not write" in r.output and (foreign / "notes.txt").read_text() == "mine"
    r = _cli(*base, "--out", tmp_path / "c", "--top-k", 4)
    assert r.exit_code == 0, r.output
    r = _cli(*base, "--out", tmp_path / "c", "--top-k", 8, "--resume")
    assert r.exit_code == 2 and "top_k (--top-k) differs" in r.output
    r = _cli(*base, "--out", tmp_path / "c", "--top-k", 8, "--overwrite")
    assert r.exit_code == 0 and Store(tmp_path / "c").top_k == 8


def test_refusals_of_a_damaged_store(assets, tmp_path):
    _write(assets, tmp_path / "s", top_k=4)
    with pytest.raises(StoreError, match="no index.json"):
        Store(tmp_path)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="shard-00001.safetensors: shard is truncated"):
        Store(tmp_path / "s")
    shard.unlink()
    with pytest.raises(StoreError, match="shard missing"):
        Store(tmp_path / "s")
    (tmp_path / "s" / "index.json").unlink()
    with pytest.raises(StoreError, match="no index.json"):
        Store(tmp_path / "s")


def test_store_rows_follow_packed_batches():
    """A packed batch (hpd.data.packing) holds several examples per line, longest first: each
    example's stored rows land on its own target positions, as in the unpacked batch."""
    from types import SimpleNamespace

    from hpd.data.batches import collate
    from hpd.data.examples import Example
    from hpd.data.packing import collate_packed
    from hpd.teachers.stored import batch_rows

    rng = np.random.default_rng(0)
    examples, stored = [], {}
    for row, n in zip((7, 3, 11, 5), (9, 4, 6, 12)):
        prompt = int(rng.integers(1, n - 1))
        examples.append(Example(input_ids=rng.integers(5, 50, size=n).tolist(),
                                loss_mask=[i >= prompt for i in range(n)], prompt_len=prompt))
        targets = n - prompt  # positions whose target counts
        stored[row] = {"ids": rng.integers(0, 60, size=(targets, 2)), "logprobs": rng.random((targets, 2)),
                       "data_logprob": row * 100.0 + np.arange(targets), "rest_mass": rng.random(targets)}
    rows = [7, 3, 11, 5]
    store = SimpleNamespace(top_k=2, example=lambda i: stored[i])

    def per_example(batch, out):
        owner = (np.asarray(batch["token_rows"]) if "token_rows" in batch
                 else np.repeat(np.asarray(batch["rows"])[:, None], batch["targets"].shape[1], axis=1)).reshape(-1)
        counted = np.asarray(batch["targets"]).reshape(-1) != -100
        return {r: out["data_logprob"][counted & (owner == r)].tolist() for r in rows}

    plain = collate(examples, 0)
    plain["rows"] = np.asarray(rows)
    packed = collate_packed(examples, 0, rows=rows)
    assert packed["input_ids"].shape[0] < len(examples)  # the rows really share lines
    for batch in (plain, packed):
        found = per_example(batch, batch_rows(store, batch))
        assert found == {r: stored[r]["data_logprob"].tolist() for r in rows}
