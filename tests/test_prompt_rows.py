"""What the vLLM teacher paths rest on, without vLLM: vLLM's prompt log-probs (in its two
shapes) read into the store's rows, those rows laid on a batch's positions (packed ones too),
the batches a served teacher asks for ahead and puts back, and the server's address."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from hpd.data.batches import Batches, collate
from hpd.data.examples import IGNORE_INDEX, Dataset, Example
from hpd.data.packing import collate_packed
from hpd.teachers.prompt_rows import engine_rows, json_rows, lay_out, prompts_of, segments
from hpd.teachers.served_client import Client, ServerError, is_url

V, K = 50, 6


def _distribution(rng, n):
    z = rng.normal(0.0, 3.0, size=(n, V))
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _as_vllm(lp: np.ndarray, tokens: list[int]):
    """What vLLM gives for prompt_logprobs=K: per position j >= 1, the prompt token first (its
    rank), then the top K (ranks 1..K); as JSON (a dict: a token in the top K appears once)
    and as flat lists (always K + 1 entries)."""
    as_json, flat = [None], SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[], ranks=[])
    for j in range(1, len(tokens)):
        row, token = lp[j - 1], tokens[j]
        top = np.argsort(-row)[:K]
        entries = [(token, float(row[token]), int((row > row[token]).sum()) + 1)]
        entries += [(int(t), float(row[t]), r + 1) for r, t in enumerate(top)]
        as_json.append({str(t): {"logprob": v, "rank": r, "decoded_token": "x"} for t, v, r in entries})
        flat.start_indices.append(len(flat.token_ids))
        for t, v, r in entries:
            flat.token_ids.append(t)
            flat.logprobs.append(v)
            flat.ranks.append(r)
        flat.end_indices.append(len(flat.token_ids))
    return as_json, flat


def test_both_shapes_give_the_store_rows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=12).tolist()
    lp = _distribution(rng, len(tokens) - 1)
    as_json, flat = _as_vllm(lp, tokens)
    want_ids = np.argsort(-lp, axis=1)[:, :K]
    want_top = np.take_along_axis(lp, want_ids, 1)
    for rows in (json_rows(as_json, tokens, K, V), engine_rows(flat, tokens, K, V)):
        assert np.array_equal(rows["ids"], want_ids)
        np.testing.assert_allclose(rows["logprobs"], want_top, atol=1e-6)
        np.testing.assert_allclose(rows["data_logprob"], lp[np.arange(len(tokens) - 1), tokens[1:]], atol=1e-6)
        np.testing.assert_allclose(rows["rest_mass"], 1.0 - np.exp(want_top).sum(1), atol=1e-6)
    rows = json_rows(*_full(lp, tokens), V, V)  # the whole distribution: nothing outside it
    assert np.all(rows["rest_mass"] == 0) and np.array_equal(rows["ids"], np.argsort(-lp, axis=1))


def _full(lp, tokens):
    as_json = [None] + [{str(t): {"logprob": float(lp[j - 1, t]), "rank": int(r + 1)}
                         for r, t in enumerate(np.argsort(-lp[j - 1]))} for j in range(1, len(tokens))]
    return as_json, tokens


def test_a_malformed_answer_is_refused():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, size=5).tolist()
    as_json, flat = _as_vllm(_distribution(rng, 4), tokens)
    short = [None, *as_json[1:]]
    short[2] = dict(list(short[2].items())[:K - 1])  # an answer cut short at a position
    with pytest.raises(ValueError, match=f"{K - 1} log-probs at a position, expected the top {K}"):
        json_rows(short, tokens, K, V)
    with pytest.raises(ValueError, match="not those of the tokens sent"):
        engine_rows(flat, [tokens[0], *tokens[2:], tokens[1]], K, V)


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(4, V, size=n).tolist()
        out.append(Example(ids, [False] * 2 + [True] * (n - 2), 2))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_rows_land_on_each_sequences_positions(packed):
    examples = _examples([5, 9, 3, 7])
    batch = collate_packed(examples, 0, capacity=12) if packed else collate(examples, 0)
    spans = segments(batch)
    prompts = prompts_of(batch, spans)
    assert sorted(map(tuple, prompts)) == sorted(tuple(e.input_ids) for e in examples)
    # a row per position: its "ids" say which sequence and position it came from
    rows = [{"ids": np.array([[100 * i + t] * K for t in range(len(p) - 1)]),
             "logprobs": np.zeros((len(p) - 1, K)), "data_logprob": np.full(len(p) - 1, float(i)),
             "rest_mass": np.zeros(len(p) - 1)} for i, p in enumerate(prompts)]
    flat = lay_out(batch, spans, rows, K)
    targets = batch["targets"].reshape(-1)
    counted = np.flatnonzero(targets != IGNORE_INDEX)
    assert np.array_equal(flat["data_ids"][counted], targets[counted])  # each position's next token
    for p in counted:
        i, t = divmod(int(flat["ids"][p, 0]), 100)
        assert prompts[i][t + 1] == targets[p] and flat["data_logprob"][p] == i


def test_peek_and_rewind_across_an_epoch():
    data = Dataset("x", _examples([4] * 10), rows=10)
    batches = Batches(data, 3, 0, seed=1)  # 3 batches an epoch
    for _ in range(2):
        next(batches)
    ahead = batches.peek(4)
    assert batches.state_dict() == {"epoch": 0, "index": 2}
    drawn = [next(batches) for _ in range(4)]  # over the epoch's end
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(ahead, drawn))
    batches.rewind(3)
    again = [next(batches) for _ in range(3)]
    assert all(np.array_equal(a["rows"], b["rows"]) for a, b in zip(again, drawn[1:]))
    fresh = Batches(data, 3, 0, seed=1)
    with pytest.raises(ValueError, match="no micro-batch"):
        fresh.rewind(1)


def test_the_servers_address():
    client = Client("http://10.0.0.5:8000/v1?model=big")
    assert (client.api, client.root, client.model) == ("http://10.0.0.5:8000/v1", "http://10.0.0.5:8000", "big")
    assert Client("https://h:1").api == "https://h:1/v1"
    for bad in ("ftp://h:1/v1", "http://h:1/v2", "http:///v1"):
        with pytest.raises(ServerError, match="HOST:PORT/v1"):
            Client(bad)
    assert is_url("HTTP://h:1/v1") and not is_url("hpd:tiny/teacher") and not is_url("Qwen/Qwen2.5-0.5B")


def test_dry_run_says_a_served_teacher_is_not_planned(tmp_path):
    from hpd.models.memory import dry_run
    from hpd.train.config import DistillConfig

    cfg = DistillConfig(teacher="http://127.0.0.1:9/v1", student="hpd:tiny/student", data="x", out=str(tmp_path))
    with pytest.raises(ValueError, match="http://127.0.0.1:9/v1 is a served teacher"):
        dry_run(cfg)
