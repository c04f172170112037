"""Training from a teacher store: a TeacherSource that completes stored rows chunk by chunk.

Per position the store holds the teacher's top k log-probs, the data token's log-prob
and the probability outside the top k. `reconstruct` turns a chunk of those into full
(C, V) log-prob rows: the data token's value as stored, the rest mass spread evenly over
the tokens that are neither in the top k nor the data token, and the other top-k
entries rescaled (by a factor within the quantization error) so that each row sums to
one exactly. At k = V nothing is spread and the rows are the teacher's own. Only chunk
rows are ever built; batch x length x vocabulary never exists.

`StoreTeacher` lays a micro-batch's stored rows out on the batch's flat (row-major)
positions, so that `select(o, index)` with the chunked path's active positions picks
exactly the rows the live teacher would have given there.
"""

from __future__ import annotations

import numpy as np

from hpd.data.examples import IGNORE_INDEX
from hpd.objectives.rules import LOG_FLOOR
from hpd.teachers.store import Store, StoreError

# What a run must share with the store, in the order they are checked (the first
# difference is reported); the teacher's identity only when --teacher is given too.
RUN_FIELDS = ("data_sha256", "tokenizer_vocab_sha256", "chat_template_sha256", "max_length", "temperature",
              "tokens_sha256", "teacher_sha256")

_TINY = 1e-30


def reconstruct(o, ids, logprobs, data_ids, data_logprob, rest_mass, store_vocab: int, vocab: int | None = None):
    """Full teacher log-prob rows (C, vocab) from stored rows.

    ids (C, k) integer top-k ids; logprobs (C, k) their log-probs (decoded), in the
    compute dtype; data_ids (C,) the data tokens; data_logprob (C,) their log-probs;
    rest_mass (C,) the probability outside the top k; store_vocab the teacher's vocabulary.
    With vocab < store_vocab the rows are renormalised over the first `vocab` tokens,
    as the live teacher's head cut to the shared vocabulary would give.
    """
    k = ids.shape[-1]
    vocab = store_vocab if vocab is None else vocab
    zero = o.zeros_like(logprobs)
    is_y = ids == data_ids[:, None]  # (C, k)
    y_in_top = o.sum(o.where(is_y, zero + 1.0, zero), axis=-1) > 0.5  # (C,)
    p_y = o.exp(data_logprob)
    p_top = o.exp(logprobs)
    others = o.sum(o.where(is_y, zero, p_top), axis=-1)  # top-k mass other than y
    spread = o.where(y_in_top, rest_mass, o.maximum(rest_mass - p_y, 0.0))  # outside top k and not y
    room = o.maximum(1.0 - p_y - spread, 0.0)  # what the other top-k entries must hold
    # With no other top-k entry to hold it (k = 1 and y on top), the room joins the spread mass.
    empty = others <= _TINY
    spread = o.where(empty, spread + room, spread)
    lp_top = logprobs + o.log(o.maximum(room, _TINY) / o.maximum(others, _TINY))[:, None]
    n_spread = store_vocab - k - o.where(y_in_top, zero[:, 0], zero[:, 0] + 1.0)  # (C,)
    uniform = o.log(o.maximum(spread, _TINY) / o.maximum(n_spread, 1.0))
    uniform = o.where(spread > _TINY, uniform, zero[:, 0] + LOG_FLOOR)
    row = o.zeros((ids.shape[0], store_vocab), o.float_dtype(logprobs), logprobs) + uniform[:, None]
    row = o.put_along(row, ids, lp_top)
    row = o.put_along(row, data_ids[:, None], data_logprob[:, None])
    if vocab < store_vocab:
        row = row[:, :vocab]
        row = row - o.logsumexp(row)[:, None]
    return row


class StoreTeacher:
    """A TeacherSource over stored rows laid out on a micro-batch's flat positions.

    arrays: framework arrays ids (N, k), logprobs (N, k), data_ids (N,), data_logprob (N,),
    rest_mass (N,), N = B * T (positions without a target hold zeros and are never selected).
    """

    def __init__(self, arrays: dict, *, vocab: int, temperature: float):
        self.arrays = arrays
        self.vocab = vocab  # the teacher's vocabulary, as stored
        self.temperature = temperature

    def select(self, o, index) -> StoreTeacher:
        rows = {name: o.rows(x, index) for name, x in self.arrays.items()}
        return StoreTeacher(rows, vocab=self.vocab, temperature=self.temperature)

    def log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype):
        if abs(temperature - self.temperature) > 1e-9:
            raise StoreError(f"the teacher store holds log-probs at temperature {self.temperature}, "
                             f"the loss asks for {temperature}; cache the teacher again at that temperature")
        a = {name: x[rows] for name, x in self.arrays.items()}
        return reconstruct(o, a["ids"], o.astype(a["logprobs"], dtype), a["data_ids"],
                           o.astype(a["data_logprob"], dtype), o.astype(a["rest_mass"], dtype),
                           self.vocab, vocab)


def batch_rows(store: Store, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stored rows of a micro-batch on its flat positions (numpy), checked against the
    batch: each example must have as many stored positions as the batch has targets for it.

    A plain batch holds example `rows[r]` on line r; a packed one (hpd.data.packing) says
    which example each token belongs to in `token_rows`. Either way an example's target
    positions, in row-major order, are the order in which the store holds them."""
    if "rows" not in batch:
        raise StoreError("this batch carries no example indices, so the teacher store cannot serve it")
    targets = np.asarray(batch["targets"])
    b, t = targets.shape
    if "token_rows" in batch:
        owner = np.asarray(batch["token_rows"]).reshape(-1)
    else:
        owner = np.repeat(np.asarray(batch["rows"], dtype=np.int64), t)
    counted = targets.reshape(-1) != IGNORE_INDEX
    k = store.top_k
    out = {"ids": np.zeros((b * t, k), np.int64), "logprobs": np.zeros((b * t, k), np.float32),
           "data_ids": np.where(targets == IGNORE_INDEX, 0, targets).reshape(-1).astype(np.int64),
           "data_logprob": np.zeros((b * t,), np.float32), "rest_mass": np.zeros((b * t,), np.float32)}
    examples, copies = np.unique(np.asarray(batch["rows"], dtype=np.int64), return_counts=True)
    for example, m in zip(examples.tolist(), copies.tolist()):  # an example twice in a batch: its rows twice
        flat = np.flatnonzero(counted & (owner == example))
        stored = store.example(int(example))
        if m * len(stored["data_logprob"]) != len(flat):
            raise StoreError(f"example {example}: the store holds {len(stored['data_logprob'])} target positions, "
                             f"the batch {len(flat) // m}; the store was written for other data or settings")
        for name in ("ids", "logprobs", "data_logprob", "rest_mass"):
            out[name][flat] = np.concatenate([stored[name]] * m) if m > 1 else stored[name]
    return out


# ----------------------------------------------------------------------------- the run's side


def on_policy_share(cfg) -> bool:
    """Whether the schedule ever trains on student rollouts (which a store cannot score)."""
    sched = cfg.schedule_config()
    return sched.lambda_start > 0 or (sched.lambda_end or 0.0) > 0


def config_errors(cfg) -> list[str]:
    """Problems of a config with a teacher store, for DistillConfig.validate."""
    errors = []
    try:
        share = on_policy_share(cfg)
    except ValueError:
        return errors  # the schedule's own error is reported by validate
    if share and cfg.teacher_cache and not cfg.teacher:
        errors.append("teacher_cache: the schedule trains on student rollouts (an on-policy share), which a "
                      "teacher store cannot score; pass --teacher as well (it is used on those steps only)")
    alone = sorted(set(cfg.teacher_caches) - set(cfg.teachers))
    if share and alone:
        errors.append(f"teacher_caches: the schedule trains on student rollouts (an on-policy share), which the "
                      f"stores of {', '.join(alone)} cannot score; name their models too (--teacher NAME=SOURCE)")
    return errors


def open_for_run(cfg, tokenizer, dataset, cache: str | None = None, teacher: str | None = None) -> Store:
    """The run's store (`cache`, default the config's), after checking that it was written
    for this data, tokenizer and settings, and by `teacher` (default the config's) when one
    is named."""
    from hpd.teachers.cache import (
        data_provenance,
        first_difference,
        teacher_fingerprint,
    )

    cache = cfg.teacher_cache if cache is None else cache
    teacher = cfg.teacher if teacher is None else teacher
    store = Store(cache)
    wanted = {**data_provenance(cfg.data, tokenizer, dataset, cfg.max_length), "temperature": float(cfg.temperature)}
    if teacher:
        wanted["teacher_sha256"] = teacher_fingerprint(teacher)
    diff = first_difference(store.provenance, wanted, RUN_FIELDS)
    if diff and diff.startswith("tokenizer_vocab_sha256"):  # the rows are over another tokenizer's ids
        made = ("another student tokenizer (its rows are aligned to that tokenizer's ids)"
                if store.provenance.get("teacher_tokenizer") == "cross" else "the teacher's tokenizer")
        raise StoreError(f"the teacher store {cache} was made for {made}, not this student's "
                         f"({cfg.student}): {diff}; cache the teacher again with --student {cfg.student}")
    if diff:
        raise StoreError(f"the teacher store {cache} does not match this run: {diff}")
    return store


def store_source(store: Store, live):
    """The Loop's `teacher_source` hook: the store on offline steps, `live` (a hook of the
    teacher model's forward; None without a model) on steps whose batches are student
    rollouts."""

    def teacher_source(loop, micro_batch, arrays, plan):
        if getattr(plan, "on_policy", False) or "rows" not in micro_batch:
            if live is None:
                raise StoreError("this step trains on student rollouts, which the teacher store cannot score; "
                                 "pass --teacher as well")
            return live(loop, micro_batch, arrays, plan)
        rows = loop.backend.to_arrays(batch_rows(store, micro_batch))
        return StoreTeacher(rows, vocab=store.vocab, temperature=store.temperature)

    return teacher_source


__all__ = ["reconstruct", "StoreTeacher", "batch_rows", "store_source", "open_for_run", "config_errors",
           "on_policy_share"]
