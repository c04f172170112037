"""Cross-tokenizer distillation: a teacher with another tokenizer, as one more TeacherSource.

The objectives never learn that the teacher reads other tokens. Before training, every
row of the data is rendered by both tokenizers and its student targets are paired
with teacher positions (`hpd.teachers.pairing`). At each step the teacher runs on its
own tokens of the micro-batch, and `CrossTeacher` hands the loss, for each student
target, a row over the student's vocabulary:

  paired target   the teacher's log-probs at its paired position, gathered onto the
                  student's ids at the shared tokens (same bytes after each
                  convention's space and byte markers: `hpd.teachers.align.shared_vocab`)
                  and renormalised over them; tokens the teacher does not share get
                  -inf, which every method already reads as "ruled out";
  unpaired target the data token with probability one: where the teacher has no row
                  for the student's token, the data stands in for it (an SFT term).

Every method in the catalogue then runs on these rows unchanged. HPD's student sample
is drawn from the student as always; when it falls outside the shared part the teacher
rules it out and the rule counts it as no sample: no weight, nothing added to the data
token's (see `hpd.objectives.rules.hpd`). ULD's
sorted distance (`uld`, `--uld-weight`) gets the teacher's whole distribution at a
paired target, its own vocabulary sorted (`sorted_log_probs`), so the mass on tokens the
student cannot name still counts there; an unpaired target gets the data token's row
there too (no teacher signal).

Metrics: `cross/aligned`, the share of student target positions with a teacher row,
and `cross/shared_mass`, the teacher's mean probability on shared tokens at them.

Cost: one pairing per example before training, linear in its length; per step, the
teacher's forward on its own tokens and a gather of (C, V_t) into (C, V_s) per chunk
(measured figures: benchmarks/results/). The chunks are sized by the wider of the two
vocabularies (`width`), so one chunk's buffers stay within --chunk-budget-mb as on the
same-tokenizer path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from hpd.data.examples import IGNORE_INDEX, check_tokenizers, encode_row
from hpd.data.sources import read_rows
from hpd.objectives.ops import ops_for
from hpd.teachers.align import shared_vocab_from_tokenizers
from hpd.teachers.live import teacher_source_of
from hpd.teachers.pairing import Paired, PairingError, Speller, pair_identical, pair_row

MODES = ("auto", "same", "cross")


def identical(student_tok, teacher_tok) -> bool:
    """Equal token for token (and in their special ids): the plain path applies as is."""
    try:
        check_tokenizers(teacher_tok, student_tok)
    except ValueError:
        return False
    return True


def choose_mode(mode: str, student_tok, teacher_tok) -> tuple[str, str]:
    """('same' | 'cross', why), for the run's start line."""
    if mode not in MODES:
        raise ValueError(f"--teacher-tokenizer {mode!r}: allowed {', '.join(MODES)}")
    same = identical(student_tok, teacher_tok)
    if mode == "same":
        if not same:
            check_tokenizers(teacher_tok, student_tok)  # raises, saying how they differ
        return "same", "as asked"
    if mode == "cross":
        return "cross", "as asked" + (" (the vocabularies are equal: every token is shared)" if same else "")
    if same:
        return "same", "auto: the two vocabularies are equal token for token"
    return "cross", f"auto: the vocabularies differ ({len(student_tok)} vs {len(teacher_tok)} tokens)"


def teacher_ids_of(student_tok, teacher_tok) -> np.ndarray:
    """(len(student_tok),) the teacher id of each student token, -1 where it has none:
    the identity for one tokenizer; else tokens of the same bytes, the EOS pair by role,
    and special tokens spelt alike."""
    n = len(student_tok)
    if identical(student_tok, teacher_tok):
        return np.arange(n, dtype=np.int64)
    sv = shared_vocab_from_tokenizers(student_tok, teacher_tok)
    out = np.full(n, -1, dtype=np.int64)
    out[sv.student_ids] = sv.teacher_ids
    t_vocab = teacher_tok.get_vocab()
    t_specials = set(teacher_tok.all_special_ids)
    for name, i in zip(student_tok.all_special_tokens, student_tok.all_special_ids):
        if out[i] < 0 and t_vocab.get(name) in t_specials:
            out[i] = t_vocab[name]
    return out


def example_key(ids, mask_from_1) -> bytes:
    """What a batch row is found by: its token ids and which of them (from the second on)
    are targets."""
    h = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16)
    h.update(np.packbits(np.asarray(mask_from_1, dtype=bool)).tobytes())
    return h.digest()


@dataclass
class CrossData:
    """Every prepared example's teacher tokens and pairs, found by the student's tokens."""

    teacher_tok: object
    identical: bool
    teacher_id_of: np.ndarray  # (len(student_tok),)
    examples: dict[bytes, Paired] = field(default_factory=dict)
    targets: int = 0
    paired: int = 0

    @property
    def share(self) -> float:
        return self.paired / max(self.targets, 1)

    def digest(self) -> str:
        """sha256 of every example's teacher tokens and pairs: what a store laid out by them records."""
        h = hashlib.sha256()
        for key in sorted(self.examples):
            p = self.examples[key]
            h.update(key)
            for x in (p.teacher_ids, p.student_pos, p.teacher_pos):
                h.update(np.asarray(x, dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()

    def describe(self) -> str:
        shared = int((self.teacher_id_of >= 0).sum())
        return (f"{shared} of the student's {len(self.teacher_id_of)} tokens shared; "
                f"{100 * self.share:.1f}% of {self.targets} student target positions paired with a teacher position")


def prepare(sources, student_tok, teacher_tok, max_length: int, *, same: bool | None = None,
            keep=None) -> CrossData:
    """Pair every row of `sources` [(path, read_rows kwargs)]. A row the two tokenizers
    cannot share raises PairingError with its place; a file with no paired target at all
    too (the tokenizers have no text in common). `same` (default: whether the tokenizers
    are identical) takes the one-tokenizer shortcut; False aligns by text whatever they are."""
    same = identical(student_tok, teacher_tok) if same is None else same
    ids_of = np.arange(len(student_tok), dtype=np.int64) if same else teacher_ids_of(student_tok, teacher_tok)
    data = CrossData(teacher_tok, same, ids_of)
    spellers = None if same else (Speller(student_tok), Speller(teacher_tok))
    for path, kwargs in sources:
        targets = paired = 0
        for where, row in read_rows(path, **kwargs):
            if keep is not None and not keep(row):  # another teacher's row (hpd.teachers.named)
                continue
            try:
                ex = encode_row(row, student_tok)
                n = min(len(ex.input_ids), max_length)
                p = (pair_identical(ex, max_length) if same else
                     pair_row(row, student_tok, teacher_tok, spellers, data.teacher_id_of, max_length))
            except ValueError as e:  # PairingError and the data's own errors
                raise PairingError(f"{where}: {e}") from None
            data.examples[example_key(ex.input_ids[:n], ex.loss_mask[1:n])] = p
            targets, paired = targets + p.targets, paired + len(p.student_pos)
        if targets and not paired:
            raise PairingError(f"{path}: no student target pairs with a teacher position: the two tokenizers "
                               "have no text in common there (no shared token at a common cut)")
        data.targets, data.paired = data.targets + targets, data.paired + paired
    return data


def teacher_batch(data: CrossData, batch: dict, pad_id: int) -> dict[str, np.ndarray]:
    """The teacher's tokens for a micro-batch (right-padded) and, per flat student position,
    the flat teacher position that teaches it (-1: none)."""
    if "token_rows" in batch:
        raise ValueError("--teacher-tokenizer cross does not serve packed batches; drop --packing")
    ids, targets = np.asarray(batch["input_ids"]), np.asarray(batch["targets"])
    lengths = np.asarray(batch["attention_mask"]).sum(axis=1)
    rows = []
    for b in range(len(ids)):
        n = int(lengths[b])
        key = example_key(ids[b, :n], targets[b, :n - 1] != IGNORE_INDEX)
        if key not in data.examples:
            raise ValueError(f"batch row {b} was not prepared for the cross-tokenizer teacher (a student rollout?); "
                             "cross-tokenizer runs train on the data's rows only")
        rows.append(data.examples[key])
    width = max(len(p.teacher_ids) for p in rows)
    t_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    where = np.full(ids.shape, -1, dtype=np.int64)
    for b, p in enumerate(rows):
        t_ids[b, :len(p.teacher_ids)] = p.teacher_ids
        mask[b, :len(p.teacher_ids)] = 1
        where[b, p.student_pos - 1] = b * width + p.teacher_pos
    return {"input_ids": t_ids, "attention_mask": mask, "where": where.reshape(-1)}


class CrossTeacher:
    """A TeacherSource over the student's positions, from a source over the teacher's
    (`inner`: its live head or logits). where (B*T_s,): the flat teacher position of each
    student position (-1: none); gather (V_s,): the teacher column of each student id (a
    -inf column, index V_t, where unshared); targets: the student's (B, T_s)."""

    def __init__(self, inner, where, gather, targets, *, vocab: int, teacher_vocab: int, identical: bool,
                 tally: dict | None = None, paired=None, y=None):
        self.inner, self.where, self.gather, self.targets = inner, where, gather, targets
        self.vocab, self.teacher_vocab, self.identical = vocab, teacher_vocab, identical
        self.tally = {} if tally is None else tally  # shared with every selection: the step's metrics
        self.paired, self.y = paired, y
        self._last = None  # (rows, temperature, teacher log-probs): the sorted view reuses them

    @property
    def width(self) -> int:
        """Columns a row passes through: the teacher's vocabulary (and a -inf one), the
        chunked loss's chunks are sized by it."""
        return self.vocab if self.identical else self.teacher_vocab + 1

    def select(self, o, index) -> CrossTeacher:
        w = o.rows(self.where, index)
        paired = w >= 0
        inner = self.inner.select(o, o.where(paired, w, 0 * w))
        y = o.rows(o.int_array(self.targets).reshape((-1,)), index)
        return CrossTeacher(inner, None, self.gather, None, vocab=self.vocab, teacher_vocab=self.teacher_vocab,
                            identical=self.identical, tally=self.tally, paired=paired, y=y)

    def _teacher(self, o, rows, temperature, dtype):
        if self._last is None or self._last[:2] != (rows, temperature):
            self._last = (rows, temperature, self.inner.log_probs(o, rows, self.teacher_vocab, temperature, dtype))
        return self._last[2]

    def _data_rows(self, o, y, like):
        """(C, V) log-probs with all the mass on y."""
        hot = o.put(like, y, o.zeros_like(like[:, 0]) + 1.0)
        return o.where(hot > 0.5, o.zeros_like(like), o.full_like(like, -float("inf")))

    def log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype):
        paired, y = self.paired[rows], self.y[rows]
        if self.identical:  # one tokenizer: the live teacher's own row, as the same-tokenizer path gives it
            row = self.inner.log_probs(o, rows, vocab, temperature, dtype)
            mass = o.zeros_like(row[:, 0]) + 1.0
        else:
            lp = self._teacher(o, rows, temperature, dtype)  # (C, V_t)
            edge = o.full_like(lp[:, :1], -float("inf"))
            row = o.columns(o.concat([lp, edge], axis=1), self.gather[:vocab])  # (C, V_s)
            total = o.logsumexp(row)
            row = row - total[:, None]
            mass = o.exp(total)
        row = o.where(paired[:, None], row, self._data_rows(o, y, row))
        self._count(o, paired, mass)
        o.evaluate(row, *self.tally.values())
        return row

    def sorted_log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype):
        """The teacher's whole distribution sorted, cut or padded to `vocab` columns, for ULD."""
        paired, y = self.paired[rows], self.y[rows]
        if self.identical:
            return o.sort_desc(self.log_probs(o, rows, vocab, temperature, dtype))
        s = o.sort_desc(self._teacher(o, rows, temperature, dtype))
        if s.shape[-1] >= vocab:  # the teacher's smallest probabilities pair with the student's padding
            s = s[:, :vocab]
        else:  # the teacher's vocabulary is the smaller: zeros pad it
            s = o.concat([s, o.zeros((s.shape[0], vocab - s.shape[-1]), dtype, s) - float("inf")], axis=1)
        return o.where(paired[:, None], s, self._data_rows(o, 0 * y, s))

    def _count(self, o, paired, mass):
        one = o.zeros_like(mass) + 1.0
        add = {"positions": o.sum(one), "paired": o.sum(o.where(paired, one, 0.0 * one)),
               "mass": o.sum(o.where(paired, mass, 0.0 * mass))}
        for k, v in add.items():
            self.tally[k] = self.tally[k] + v if k in self.tally else v

    def metrics(self) -> dict[str, float]:
        if not self.tally:
            return {}
        o = ops_for(self.tally["positions"])
        positions, paired = o.item(self.tally["positions"]), o.item(self.tally["paired"])
        return {"cross/aligned": paired / max(positions, 1.0),
                "cross/shared_mass": o.item(self.tally["mass"]) / max(paired, 1.0)}


def run_errors(cfg) -> list[str]:
    """What a cross-tokenizer run cannot do (yet), as config errors."""
    sched = cfg.schedule_config()
    errors = []
    if sched.lambda_start > 0 or (sched.lambda_end or 0.0) > 0:  # a share of steps on student rollouts
        errors.append("the schedule trains on student rollouts (an on-policy share), which the cross-tokenizer "
                      "teacher cannot align yet; use an off-policy schedule")
    if cfg.packing:
        errors.append("--packing: packed batches are not served across tokenizers; drop --packing")
    return errors


def prepare_for_run(cfg, student_tok, teacher_tok, eval_kwargs: dict | None = None, keep=None) -> CrossData:
    """The run's pairs: its data and held-out data (the rows `keep` accepts, when given),
    after checking what the run asks for."""
    errors = run_errors(cfg)
    if errors:
        raise ValueError("--teacher-tokenizer cross: " + "; ".join(errors))
    sources = [(cfg.data, {"split": cfg.data_split, "columns": cfg.data_columns})]
    if cfg.eval_data:
        sources.append((cfg.eval_data, dict(eval_kwargs or {})))
    return prepare(sources, student_tok, teacher_tok, cfg.max_length, keep=keep)


def gather_map(data: CrossData, vocab: int, teacher_vocab: int) -> np.ndarray:
    """(vocab,) the teacher column of each student id: its shared teacher id, or
    `teacher_vocab` (the -inf column a CrossTeacher adds) where it has none."""
    ids = data.teacher_id_of[:vocab]
    ids = np.concatenate([ids, np.full(max(vocab - len(ids), 0), -1, np.int64)])
    return np.where((ids >= 0) & (ids < teacher_vocab), ids, teacher_vocab)


def batch_teacher(backend, teacher, data: CrossData, batch: dict, targets, *, vocab: int, hidden: bool,
                  cache: dict) -> CrossTeacher:
    """The teacher's forward on its own tokens of `batch` (numpy, the student's), as a
    CrossTeacher over the student's positions; `cache` keeps the vocabulary map's array."""
    if "gather" not in cache:
        v_t = backend.vocab_size(teacher)
        cache["gather"] = backend.to_arrays({"g": gather_map(data, vocab, v_t)})["g"]
        cache["v_t"] = v_t
    tok = data.teacher_tok
    t = teacher_batch(data, batch, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    out = backend.forward(teacher, backend.to_arrays({k: t[k] for k in ("input_ids", "attention_mask")}),
                          hidden=hidden)
    where = backend.to_arrays({"w": t["where"]})["w"]
    return CrossTeacher(teacher_source_of(out), where, cache["gather"], targets, vocab=vocab,
                        teacher_vocab=cache["v_t"], identical=data.identical)


def cross_source(data: CrossData, model_of=None):
    """The Loop's `teacher_source` hook for a teacher of another tokenizer: its forward on
    its own tokens of the micro-batch, as a `CrossTeacher` (evaluation batches too). The
    teacher is the loop's, or the model `model_of()` returns."""
    cache: dict = {}

    def teacher_source(loop, micro_batch, arrays, plan):
        teacher = loop.teacher if model_of is None else model_of()
        return batch_teacher(loop.backend, teacher, data, micro_batch, arrays["targets"], vocab=loop.vocab,
                             hidden=loop.chunked and plan is not None, cache=cache)

    return teacher_source


__all__ = ["MODES", "CrossData", "CrossTeacher", "batch_teacher", "choose_mode", "cross_source", "example_key",
           "gather_map", "identical", "prepare", "prepare_for_run", "run_errors", "teacher_batch", "teacher_ids_of"]
