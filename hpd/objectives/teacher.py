"""Where the teacher's log-probs come from: one interface, several sources.

The objectives need, for each chunk of supervised positions, a row of teacher
log-probs. A `TeacherSource` hands them out; the loss never asks which source it has:

- `LiveTeacher`: the teacher model's final hidden states and its `Head`, projected a
  chunk at a time (the chunked path; a quantized or soft-capped head included);
- `LogitsTeacher`: logits the teacher model already produced (the plain path);
- an offline store of top-k log-probs (`hpd.teachers.store`), completed into full rows.

A source is first narrowed to the positions whose target counts (`select`, with flat
row-major indices over the targets' shape), then asked for rows of that selection.

Optional members serve what a row over the student's vocabulary cannot say (the
cross-tokenizer teacher, `hpd.teachers.cross`, has them): `sorted_log_probs`, the
teacher's whole distribution sorted, for ULD's distance; `width`, the columns a row
passes through on its way (its own vocabulary), which sizes the chunked loss's chunks;
`metrics()`, the source's own figures for the step's record; and `groups`, (each
position's group (B, T), the groups' names) for a source over the rows of several teachers
(`hpd.teachers.routed`), by which the loss also reports its metrics per teacher.
"""

from __future__ import annotations

from typing import Any, Protocol

from hpd.objectives.heads import Head, as_head, half_logits, project


class TeacherSource(Protocol):
    vocab: int  # columns the source can give (the shared vocabulary is at most this)

    def select(self, o, index) -> TeacherSource:
        """The source at flat positions `index` (N,), row-major over the targets' shape."""
        ...

    def log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype) -> Any:
        """(C, vocab) teacher log-probs at `temperature` for rows `rows` of the selection."""
        ...


class LiveTeacher:
    """Hidden states (..., H) of the teacher and its output head."""

    def __init__(self, hidden, head: Head | Any):
        self.hidden = hidden
        self.head = as_head(head)
        self._weight = None  # the dense head cast to the compute dtype, once per loss
        self._dtype = None

    @property
    def vocab(self) -> int:
        return self.head.vocab

    def select(self, o, index) -> LiveTeacher:
        h = o.stop_gradient(self.hidden)
        return LiveTeacher(o.rows(h.reshape((-1, h.shape[-1])), index), self.head)

    def log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype):
        head = self.head
        if not head.quantized and (self._weight is None or self._dtype != dtype):
            w = o.stop_gradient(head.weight)[:vocab]
            self._weight = w if half_logits(o, w, dtype) else o.astype(w, dtype)  # as stored: no float32 copy
            self._dtype = dtype
        z, _ = project(o, head, self.hidden[rows], vocab, temperature, dtype=dtype, weight=self._weight)
        return o.log_softmax(z)


class LogitsTeacher:
    """Teacher logits (..., V) computed by the model itself."""

    def __init__(self, logits):
        self.logits = logits

    @property
    def vocab(self) -> int:
        return int(self.logits.shape[-1])

    def select(self, o, index) -> LogitsTeacher:
        z = o.stop_gradient(self.logits)
        return LogitsTeacher(o.rows(z.reshape((-1, z.shape[-1])), index))

    def log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype):
        z = o.astype(self.logits[rows][:, :vocab], dtype)
        if temperature != 1.0:
            z = z / temperature
        return o.log_softmax(z)


def sorted_log_probs(o, source, rows: slice, vocab: int, temperature: float, dtype, row=None):
    """(C, vocab) teacher log-probs sorted descending, for ULD's distance: the source's own
    (over the teacher's whole vocabulary, where it has one beyond the student's), else
    its row (given, or asked for) sorted."""
    if hasattr(source, "sorted_log_probs"):
        return source.sorted_log_probs(o, rows, vocab, temperature, dtype)
    if row is None:
        row = source.log_probs(o, rows, vocab, temperature, dtype)
    return o.sort_desc(row)


def as_source(teacher) -> TeacherSource:
    """A source as it is, or teacher logits as a `LogitsTeacher`."""
    return teacher if hasattr(teacher, "log_probs") and hasattr(teacher, "select") else LogitsTeacher(teacher)


__all__ = ["TeacherSource", "LiveTeacher", "LogitsTeacher", "as_source", "sorted_log_probs"]
