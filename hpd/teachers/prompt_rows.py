"""vLLM's prompt log-probs as the teacher store's rows, laid out on a batch's positions.

Asked for `prompt_logprobs=k` on a sequence of token ids, vLLM gives, for each position
j >= 1, the log-probs of the distribution that predicts token j: its top k (ranks 1..k)
and the token j itself, inserted first, when it lies outside them. That is what
`hpd cache-teacher` keeps per target position (`hpd.teachers.store`): the top k, sorted,
the data token's exact log-prob and the probability outside the top k, here the
complement of the top k's mass (vLLM does not give the rest itself). The in-process engine
(flat lists) and the server (JSON) give the same numbers in two shapes; `engine_rows` and
`json_rows` read each.

A batch (right-padded, or packed: `hpd.data.packing`) holds one or more sequences per
line (`segments`); each is sent as it is, and `lay_out` puts its rows back on the batch's
flat positions, so that `hpd.teachers.stored.StoreTeacher` serves them as it serves a
store's.
"""

from __future__ import annotations

import numpy as np

ROWS = ("ids", "logprobs", "data_logprob", "rest_mass")


def _rows(ids, logprobs, ranks, data_lp, k: int, vocab: int) -> dict[str, np.ndarray]:
    """k entries per position, in any order (flat lists, or (P, k) arrays) -> the store's rows,
    top k sorted."""
    p = len(data_lp)
    ids_a = np.asarray(ids, dtype=np.int64).reshape(p, k)
    lp_a = np.asarray(logprobs, dtype=np.float64).reshape(p, k)
    order = np.argsort(np.asarray(ranks, dtype=np.int64).reshape(p, k), axis=1, kind="stable")
    ids_a, lp_a = np.take_along_axis(ids_a, order, 1), np.take_along_axis(lp_a, order, 1)
    if k >= vocab:  # the whole distribution: nothing outside it
        rest = np.zeros(p)
    else:  # what the top k leave, at most what the tokens below the k-th can hold
        rest = np.clip(1.0 - np.exp(lp_a).sum(axis=1), 0.0, (vocab - k) * np.exp(lp_a[:, -1]))
    return {"ids": ids_a, "logprobs": lp_a.astype(np.float32),
            "data_logprob": np.asarray(data_lp, dtype=np.float32), "rest_mass": rest.astype(np.float32)}


def _check(where: str, found: int, k: int) -> None:
    if found not in (k, k + 1):
        raise ValueError(f"{where}: {found} log-probs at a position, expected the top {k} "
                         "(and the prompt's token)")


def engine_rows(prompt_logprobs, tokens, k: int, vocab: int) -> dict[str, np.ndarray]:
    """The rows of positions 0 .. n-2 of one sequence (position t predicts tokens[t + 1]) from
    an in-process engine's `RequestOutput.prompt_logprobs`, asked for as `FlatLogprobs`
    (`SamplingParams(flat_logprobs=True)`): per position, the prompt's token, then the top k."""
    flat = prompt_logprobs
    starts = np.asarray(flat.start_indices[1:], dtype=np.int64)
    counts = np.asarray(flat.end_indices[1:], dtype=np.int64) - starts
    if len(starts) != len(tokens) - 1 or np.any(counts != k + 1):
        raise ValueError(f"the engine gave {sorted(set(counts.tolist()))} log-probs at a position for "
                         f"{len(tokens)} tokens, expected the prompt's token and the top {k} at each")
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    lps = np.asarray(flat.logprobs, dtype=np.float64)
    ranks = np.asarray(flat.ranks, dtype=np.int64)
    if not np.array_equal(ids[starts], np.asarray(tokens[1:], dtype=np.int64)):
        raise ValueError("the engine's prompt log-probs are not those of the tokens sent")
    top = starts[:, None] + 1 + np.arange(k)  # (P, k)
    return _rows(ids[top], lps[top], ranks[top], lps[starts], k, vocab)


def json_rows(prompt_logprobs: list, tokens, k: int, vocab: int) -> dict[str, np.ndarray]:
    """As `engine_rows`, from a server's `choices[i].prompt_logprobs` (keys are the ids as text)."""
    ids, lps, ranks, data = [], [], [], []
    for j in range(1, len(tokens)):
        entry = prompt_logprobs[j]
        _check(f"prompt position {j}", len(entry), k)
        data.append(entry[str(int(tokens[j]))]["logprob"])
        items = list(entry.items())
        for token, lp in items[len(items) - k:]:
            ids.append(int(token))
            lps.append(lp["logprob"])
            ranks.append(lp["rank"])
    return _rows(ids, lps, ranks, data, k, vocab)


def segments(batch: dict) -> list[tuple[int, int]]:
    """(flat start, length) of every sequence of a batch: a line of a right-padded batch,
    or each row packed into a line (a new one wherever the position restarts at 0)."""
    ids = np.asarray(batch["input_ids"])
    b, t = ids.shape
    if "token_rows" in batch:
        owner, positions = np.asarray(batch["token_rows"]), np.asarray(batch["position_ids"])
        out = []
        for line in range(b):
            starts = np.flatnonzero(positions[line] == 0).tolist()
            for s, e in zip(starts, starts[1:] + [t]):
                if owner[line, s] >= 0:  # the padding after a line's rows is a segment of its own
                    out.append((line * t + s, e - s))
        return out
    lengths = np.asarray(batch["attention_mask"]).sum(axis=1)
    return [(line * t, int(n)) for line, n in enumerate(lengths)]


def prompts_of(batch: dict, spans: list[tuple[int, int]]) -> list[list[int]]:
    """The token ids of each sequence with a position to score (two tokens or more)."""
    flat = np.asarray(batch["input_ids"]).reshape(-1)
    return [flat[s:s + n].tolist() for s, n in spans if n >= 2]


def lay_out(batch: dict, spans: list[tuple[int, int]], rows: list[dict[str, np.ndarray]], k: int) -> dict:
    """The rows of each sequence (in the order of `prompts_of`) on the batch's flat
    positions: ids (N, k), logprobs (N, k), data_ids (N,), data_logprob (N,), rest_mass (N,),
    N = B * T; data_ids is each position's next token (its target where it has one)."""
    flat = np.asarray(batch["input_ids"]).reshape(-1)
    n = flat.shape[0]
    out = {"ids": np.zeros((n, k), np.int64), "logprobs": np.zeros((n, k), np.float32),
           "data_ids": np.zeros((n,), np.int64), "data_logprob": np.zeros((n,), np.float32),
           "rest_mass": np.zeros((n,), np.float32)}
    scored = iter(rows)
    for start, length in spans:
        if length < 2:
            continue
        got = next(scored)
        at = slice(start, start + length - 1)
        for name in ROWS:
            out[name][at] = got[name]
        out["data_ids"][at] = flat[start + 1:start + length]
    return out


__all__ = ["ROWS", "engine_rows", "json_rows", "lay_out", "prompts_of", "segments"]
