"""Rows that name their teacher: a column of each row picks the teacher that scores it.

The data reads the column and checks it against the run's teacher names before any
model loads (a row without one, or naming an unknown teacher, is refused with its
`file:line` unless a default is given). Each example keeps its teacher as an index into
the sorted names; a batch carries `route` (B, T), each position's teacher (-1 where no
row is: packed padding), so that routing stays a pure function of the rows through
packing, rollouts and resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Route:
    column: str  # the row field that names the teacher
    names: tuple[str, ...]  # the run's teachers, sorted: a row's route is an index into them
    default: str = ""  # the teacher of a row that names none ("": such a row is refused)

    def of(self, row: dict) -> int:
        """The row's teacher index; ValueError (the caller adds where) for a missing or unknown name."""
        name = row.get(self.column)
        if name is None or name == "":
            if not self.default:
                raise ValueError(f'no "{self.column}" field naming its teacher (teachers: {", ".join(self.names)}); '
                                 "add one, or pass --default-teacher NAME")
            name = self.default
        if not isinstance(name, str) or name not in self.names:
            raise ValueError(f'"{self.column}": {name!r} is not one of the teachers ({", ".join(self.names)})')
        return self.names.index(name)


def row_routes(examples) -> np.ndarray | None:
    """(B,) each example's teacher, or None when no example names one."""
    routes = [e.route for e in examples]
    return None if all(r < 0 for r in routes) else np.asarray(routes, dtype=np.int64)


def prompt_routes(batch: dict[str, np.ndarray]) -> list[int] | None:
    """Each row's teacher in the order of `hpd.train.rollout.prompts_of` (packed rows too)."""
    if "route" not in batch:
        return None
    route = batch["route"]
    if "token_rows" in batch:
        owner = batch["token_rows"]
        return [int(route[owner == r][0]) for r in batch["rows"]]
    return [int(r) for r in route[:, 0]]


def take_rows(batch: dict[str, np.ndarray], lines: np.ndarray) -> dict[str, np.ndarray]:
    """The batch at its rows `lines` (B' of B): every (B, ...) array cut to them; in a packed
    batch, the examples' own arrays (`rows`, `prompt_lens`) cut to the examples those rows hold."""
    b = batch["input_ids"].shape[0]
    out = {}
    if "token_rows" in batch:
        held = np.isin(batch["rows"], batch["token_rows"][lines])
        out.update(rows=batch["rows"][held], prompt_lens=batch["prompt_lens"][held])
    for key, x in batch.items():
        if key not in out and isinstance(x, np.ndarray) and x.ndim >= 1 and x.shape[0] == b:
            out[key] = x[lines]
        elif key not in out:
            out[key] = x
    return out


__all__ = ["Route", "prompt_routes", "row_routes", "take_rows"]
