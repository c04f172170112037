"""Sound working for the sums tasks, in any mix of styles: which lines may follow which.

The three styles of :mod:`hpd.tasks.sums` are three paths through one small grammar. A
line is a true step from what is already written::

    x: v              a running total starts at x's value            a: 7
    x: T+v=S          x added to a total T already written           b: 7+3=10
    x+y = u+v = s     two numbers not yet used, added                c+d = 9+4 = 13
    x = v             one number not yet used, on its own            e = 8
    T+P = S           two totals already written, added              10+13 = 23
    Answer: N         the sum, once one total covers every number    Answer: 23

A working is sound when each of its lines is one of these from the state before it; a
working that opens forward and goes on in pairs (``a: 7`` then ``c+d = 9+4 = 13``) is
sound, one with a wrong sum or a number used twice is not. :func:`sound_prefix` says
whether a half-written answer (its last line may be cut anywhere) is still sound: the
prefixes a teacher must be able to continue on a student's rollouts.

:func:`random_working` walks the grammar at random (mixed styles), :func:`finish` writes a
fixed correct continuation from any sound state: the running total goes on in its
direction, anything else goes on in pairs. Pure Python.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hpd.tasks.sums import STYLES, Problem, parse_prompt

KINDS = ("start", "extend", "pair", "single", "merge", "answer")


@dataclass(frozen=True)
class Total:
    letters: tuple  # in the order they were added
    value: int


@dataclass(frozen=True)
class State:
    """What a working has written so far: its totals, in the order written, and whether the
    answer line is out."""

    problem: Problem
    totals: tuple = ()
    done: bool = False

    @property
    def used(self) -> set:
        return {x for t in self.totals for x in t.letters}

    def unused(self) -> list:
        return [x for x in self.problem.letters if x not in self.used]

    def value(self, letter: str) -> int:
        return self.problem.values[self.problem.letters.index(letter)]

    def _with(self, drop: tuple, new: Total) -> State:
        kept = tuple(t for i, t in enumerate(self.totals) if i not in drop)
        return State(self.problem, kept + (new,), self.done)


def next_lines(state: State) -> dict:
    """Every line that may come next, as {line: (kind, state after it)}. A line that two
    totals of equal value could both extend extends the later one."""
    if state.done:
        return {}
    out: dict = {}
    unused = state.unused()
    for x in unused:
        v = state.value(x)
        out[f"{x}: {v}"] = ("start", state._with((), Total((x,), v)))
        out[f"{x} = {v}"] = ("single", state._with((), Total((x,), v)))
        for i, t in enumerate(state.totals):
            grown = Total(t.letters + (x,), t.value + v)
            out[f"{x}: {t.value}+{v}={t.value + v}"] = ("extend", state._with((i,), grown))
        for y in unused:
            if y != x:
                w = state.value(y)
                out[f"{x}+{y} = {v}+{w} = {v + w}"] = ("pair", state._with((), Total((x, y), v + w)))
    for i, a in enumerate(state.totals):
        for j, b in enumerate(state.totals):
            if i != j:
                out[f"{a.value}+{b.value} = {a.value + b.value}"] = (
                    "merge", state._with((i, j), Total(a.letters + b.letters, a.value + b.value)))
    if len(state.totals) == 1 and not unused:
        out[f"Answer: {state.totals[0].value}"] = ("answer", State(state.problem, state.totals, True))
    return out


def walk(problem: Problem, lines: list) -> State | None:
    """The state after `lines` (complete lines), or None at the first line that is not sound."""
    state = State(problem)
    for line in lines:
        step = next_lines(state).get(line)
        if step is None:
            return None
        state = step[1]
    return state


def sound_prefix(prompt: str, text: str) -> bool:
    """Whether `text`, the start of an answer to `prompt` cut anywhere, is sound so far: every
    complete line a true step, and the last, cut line the start of one."""
    lines = text.split("\n")
    state = walk(parse_prompt(prompt), lines[:-1])
    if state is None:
        return False
    last = lines[-1]
    return last == "" and not state.done or any(line.startswith(last) for line in next_lines(state))


def shape(prompt: str, text: str) -> str:
    """What kinds of line a sound prefix has written: "first line" (too little to tell), "running"
    (forward or backward lines only), "pairs" (pair, single and sum lines only) or "mixed". A cut
    last line counts where every line it could be the start of is of one kind."""
    *lines, last = text.split("\n")
    state, kinds = State(parse_prompt(prompt)), set()
    for line in lines:
        kind, state = next_lines(state)[line]
        kinds.add(_family(kind))
    if last:
        families = {_family(k) for line, (k, _) in next_lines(state).items() if line.startswith(last)}
        kinds |= families if len(families) == 1 else set()
    kinds.discard("answer")
    return "first line" if not kinds else "mixed" if len(kinds) > 1 else kinds.pop()


def _family(kind: str) -> str:
    return "running" if kind in ("start", "extend") else "answer" if kind == "answer" else "pairs"


def sound_working(prompt: str, text: str) -> bool:
    """Whether `text` is a whole sound working: sound lines ending with the answer line."""
    state = walk(parse_prompt(prompt), text.strip().split("\n"))
    return state is not None and state.done


# the random walk's preference among kinds of line: every kind of step the students mix
_WEIGHTS = {"start": 1.0, "extend": 2.0, "pair": 1.5, "single": 0.2, "merge": 1.5, "answer": 1.0}


def random_working(problem: Problem, rng: random.Random) -> list:
    """A sound working as a list of (line, kind), each line drawn by kind (weighted) and then
    uniformly within its kind: styles mixed at random."""
    state, out = State(problem), []
    while not state.done:
        options = next_lines(state)
        kinds = sorted({k for k, _ in options.values()}, key=KINDS.index)
        kind = rng.choices(kinds, weights=[_WEIGHTS[k] for k in kinds])[0]
        line = rng.choice(sorted(line for line, (k, _) in options.items() if k == kind))
        out.append((line, kind))
        state = options[line][1]
    return out


def finish(problem: Problem, lines: list, style: str | None = None) -> list:
    """The rest of a sound working after its complete `lines`, written in `style` (forward,
    backward or pairs; by default the working's own: after a running line the running total
    goes on in its direction, forward unless its last step went down the letters, and after
    any other line the unused numbers go in pairs). Forward and backward add the unused numbers
    to the latest total one by one; pairs adds them two by two, and a last one to the first
    total. Then the totals are added in the order written, and the answer follows."""
    state = walk(problem, lines)
    if state is None:
        raise ValueError(f"not a sound working: {lines!r}")
    if style not in (None, *STYLES):
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    style = style or _style_after(problem, lines, state)
    out = []
    while not state.done:
        options = next_lines(state)
        line = _next_in(state, style, options)
        out.append(line)
        state = options[line][1]
    return out


def _style_after(problem: Problem, lines: list, state: State) -> str:
    if not lines or next_lines(walk(problem, lines[:-1]))[lines[-1]][0] not in ("start", "extend"):
        return "pairs"
    running = state.totals[-1].letters
    down = running[-1] < running[-2] if len(running) > 1 else running[0] == problem.letters[-1]
    return "backward" if down else "forward"


def _next_in(state: State, style: str, options: dict) -> str:
    unused = state.unused()
    if unused and style != "pairs":
        x = unused[-1] if style == "backward" else unused[0]
        if not state.totals:
            return f"{x}: {state.value(x)}"
        t = state.totals[-1]
        return f"{x}: {t.value}+{state.value(x)}={t.value + state.value(x)}"
    if len(unused) >= 2:
        x, y = unused[:2]
        return f"{x}+{y} = {state.value(x)}+{state.value(y)} = {state.value(x) + state.value(y)}"
    if unused and state.totals:  # a last number joins the first total, as a running line would add it
        t, x = state.totals[0], unused[0]
        return f"{x}: {t.value}+{state.value(x)}={t.value + state.value(x)}"
    if unused:
        return f"{unused[0]} = {state.value(unused[0])}"
    if len(state.totals) > 1:
        a, b = state.totals[:2]
        return f"{a.value}+{b.value} = {a.value + b.value}"
    return next(line for line, (k, _) in options.items() if k == "answer")


__all__ = ["State", "Total", "next_lines", "walk", "sound_prefix", "sound_working", "shape", "random_working", "finish"]
