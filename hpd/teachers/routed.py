"""Several teachers in one batch: each position scored by the teacher its row names.

A micro-batch whose rows name different teachers (hpd.data.routing: `route`, (B, T)) is
cut into one sub-batch per teacher (the rows that hold any of its positions), each
teacher's own source scores its sub-batch in one pass, and `RoutedTeacher` puts the
rows back in the order of the batch's positions. The loss sees one `TeacherSource` and
never learns there were several; the source also names each position's teacher
(`groups`), so that the loss reports its metrics per teacher.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpd.objectives.teacher import sorted_log_probs


class RoutedTeacher:
    """parts: (teacher index, its TeacherSource over its sub-batch, the sub-batch's rows in
    the batch); route (B, T): each position's teacher; names: the teachers, by index."""

    def __init__(self, parts: list[tuple[int, Any, np.ndarray]], route: np.ndarray, names: tuple[str, ...],
                 groups=None, extra: dict | None = None):
        self.parts, self.route, self.names = parts, np.asarray(route), tuple(names)
        self.groups_array = groups  # route as a backend array, for the loss's per-teacher metrics
        self.extra = dict(extra or {})  # figures of the routing itself (rows per teacher, load time)
        self._selected: list | None = None  # after select: per part, its selection and positions
        self._owner: np.ndarray | None = None

    @property
    def vocab(self) -> int:
        return min(int(source.vocab) for _, source, _ in self.parts)

    @property
    def width(self) -> int:
        return max(int(getattr(source, "width", 0)) for _, source, _ in self.parts)

    @property
    def groups(self):
        """(each position's teacher (B, T), the teachers' names), for the loss's metrics."""
        return self.groups_array, self.names

    def select(self, o, index) -> RoutedTeacher:
        flat = np.asarray(o.numpy(index), dtype=np.int64)
        length = self.route.shape[1]
        owner = self.route.reshape(-1)[flat]
        present = {k for k, _, _ in self.parts}
        if not set(np.unique(owner).tolist()) <= present:
            raise ValueError(f"positions of teachers {sorted(set(owner.tolist()) - present)} have no source here")
        selected = []
        for k, source, rows in self.parts:
            mine = np.flatnonzero(owner == k)  # this teacher's places in the selection, in order
            lookup = np.full(self.route.shape[0], -1, dtype=np.int64)
            lookup[rows] = np.arange(len(rows))
            sub = lookup[flat[mine] // length] * length + flat[mine] % length  # flat in the sub-batch
            selected.append((source.select(o, o.index_array(sub, index)), mine))
        out = RoutedTeacher(self.parts, self.route, self.names, self.groups_array, self.extra)
        out._selected, out._owner = selected, owner
        return out

    def _routed(self, o, rows: slice, row_of):
        """(C, V) rows of the selection's rows `rows`, each from its teacher's source by
        row_of(source, its own slice)."""
        start, stop, _ = rows.indices(len(self._owner))
        pieces, places = [], []
        for source, mine in self._selected:
            lo, hi = np.searchsorted(mine, [start, stop])
            if hi > lo:
                pieces.append(row_of(source, slice(int(lo), int(hi))))
                places.append(mine[lo:hi] - start)
        if len(pieces) == 1:
            return pieces[0]
        order = np.argsort(np.concatenate(places))  # back to the positions' order
        return o.rows(o.concat(pieces, axis=0), o.index_array(order, pieces[0]))

    def log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype):
        return self._routed(o, rows, lambda source, part: source.log_probs(o, part, vocab, temperature, dtype))

    def sorted_log_probs(self, o, rows: slice, vocab: int, temperature: float, dtype):
        return self._routed(o, rows, lambda source, part: sorted_log_probs(o, source, part, vocab, temperature,
                                                                          dtype))

    def metrics(self) -> dict[str, float]:
        out = dict(self.extra)
        for k, source, _ in self.parts:
            report = getattr(source, "metrics", None)
            if report is not None:
                # a source's own teacher/... figures (a served teacher's wait) become teacher/<name>/...
                out.update({f"teacher/{self.names[k]}/{key.removeprefix('teacher/')}": v
                            for key, v in report().items()})
        return out


def split_by_teacher(route: np.ndarray, count: int) -> list[tuple[int, np.ndarray]]:
    """(teacher, the batch's rows that hold any of its positions) for each teacher present."""
    out = []
    for k in range(count):
        rows = np.flatnonzero((route == k).any(axis=1))
        if len(rows):
            out.append((k, rows))
    return out


__all__ = ["RoutedTeacher", "split_by_teacher"]
