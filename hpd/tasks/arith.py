"""Synthetic multi-step arithmetic word problems, small enough for tiny models.

A problem starts from a count and applies a few gains and losses, e.g.::

    prompt:     "Mia has 12 apples. She gets 5 more. She loses 3. How many apples now?\n"
    completion: "12+5=17\n17-3=14\nAnswer: 14"

The completion shows every intermediate result and ends with a line ``Answer: N``.

Everything here is pure Python (no torch, no mlx). Generation is seeded with
``random.Random(seed)``; :func:`make_split` gives a deterministic train / held-out
split in which no held-out problem shares its arithmetic (start value and the
sequence of operations) with any training problem, whatever the wording.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass

__all__ = [
    "Problem",
    "sample_problem",
    "generate",
    "make_split",
    "extract_answer",
    "is_correct",
    "write_jsonl",
    "read_jsonl",
]

NAMES = [
    ("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Sam", "He"), ("Lea", "She"),
    ("Ben", "He"), ("Eva", "She"), ("Max", "He"), ("Zoe", "She"), ("Leo", "He"),
]
ITEMS = ["apples", "coins", "cards", "books", "pens", "shells", "stamps", "eggs"]
GAIN_VERBS = ["gets {n} more", "finds {n} more", "buys {n} more"]
LOSS_VERBS = ["loses {n}", "gives away {n}", "sells {n}"]

# Difficulty knobs and their defaults.
DEFAULTS = dict(
    min_steps=2,  # number of + / - operations, drawn uniformly in [min_steps, max_steps]
    max_steps=3,
    start_range=(1, 20),  # the starting count
    operand_range=(1, 9),  # each gain or loss
    max_value=40,  # no intermediate count above this (and none below 0)
)


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple  # ((sign, n), ...) with sign "+" or "-"
    name: str
    pronoun: str
    item: str
    verbs: tuple  # one verb template per op

    @property
    def values(self) -> list:
        """Running totals: [start, after op 1, after op 2, ...]."""
        vals = [self.start]
        for sign, n in self.ops:
            vals.append(vals[-1] + n if sign == "+" else vals[-1] - n)
        return vals

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def signature(self) -> str:
        """The arithmetic of the problem, independent of its wording."""
        return str(self.start) + "".join(f"{s}{n}" for s, n in self.ops)

    def prompt(self) -> str:
        parts = [f"{self.name} has {self.start} {self.item}."]
        for (_, n), verb in zip(self.ops, self.verbs):
            parts.append(f"{self.pronoun} {verb.format(n=n)}.")
        parts.append(f"How many {self.item} now?")
        return " ".join(parts) + "\n"

    def completion(self) -> str:
        vals = self.values
        lines = [f"{vals[i]}{s}{n}={vals[i + 1]}" for i, (s, n) in enumerate(self.ops)]
        lines.append(f"Answer: {self.answer}")
        return "\n".join(lines)

    def row(self) -> dict:
        return {"prompt": self.prompt(), "completion": self.completion()}


def _knobs(difficulty: dict) -> dict:
    unknown = set(difficulty) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown difficulty knob(s): {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    k = {**DEFAULTS, **difficulty}
    if not 1 <= k["min_steps"] <= k["max_steps"]:
        raise ValueError("need 1 <= min_steps <= max_steps")
    lo, hi = k["start_range"]
    olo, ohi = k["operand_range"]
    if not (0 <= lo <= hi <= k["max_value"] and 1 <= olo <= ohi <= k["max_value"]):
        raise ValueError("need 0 <= start_range <= max_value and 1 <= operand_range <= max_value")
    return k


def sample_problem(rng: random.Random, **difficulty) -> Problem:
    """Draw one problem; every running total stays in [0, max_value]."""
    k = _knobs(difficulty)
    n_steps = rng.randint(k["min_steps"], k["max_steps"])
    value = rng.randint(*k["start_range"])
    start = value
    ops = []
    for _ in range(n_steps):
        n = rng.randint(*k["operand_range"])
        can_add = value + n <= k["max_value"]
        can_sub = value - n >= 0
        if can_add and can_sub:
            sign = rng.choice("+-")
        elif can_add:
            sign = "+"
        elif can_sub:
            sign = "-"
        else:  # operand too big either way: shrink it
            n = min(max(value, k["max_value"] - value), n)
            n = max(n, 1)
            sign = "+" if value + n <= k["max_value"] else "-"
        value = value + n if sign == "+" else value - n
        ops.append((sign, n))
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    verbs = tuple(rng.choice(GAIN_VERBS if s == "+" else LOSS_VERBS) for s, _ in ops)
    return Problem(start, tuple(ops), name, pronoun, item, verbs)


def generate(seed: int, n: int, **difficulty) -> list:
    """`n` rows from a generator seeded with `seed` (no split, duplicates possible)."""
    rng = random.Random(seed)
    return [sample_problem(rng, **difficulty).row() for _ in range(n)]


def _is_held_signature(signature: str, held_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "big")
    return (h % 1_000_000) < held_fraction * 1_000_000


def make_split(seed: int, n_train: int, n_held: int, held_fraction: float = 0.1, **difficulty):
    """Deterministic (train_rows, held_rows).

    A problem's arithmetic signature (start value and operations) is hashed; a fixed
    `held_fraction` of signatures is reserved for the held-out set, so held-out problems
    never appear in training, not even reworded. Train prompts are distinct; held-out
    signatures are distinct. Raises if the difficulty leaves too few problems.
    """
    _knobs(difficulty)
    rng = random.Random(seed)
    train, held = [], []
    seen_prompts, held_sigs = set(), set()
    max_draws = 50 * (n_train + n_held) + 10_000
    for _ in range(max_draws):
        if len(train) >= n_train and len(held) >= n_held:
            break
        p = sample_problem(rng, **difficulty)
        sig = p.signature
        if _is_held_signature(sig, held_fraction):
            if len(held) < n_held and sig not in held_sigs:
                held_sigs.add(sig)
                held.append(p.row())
        else:
            row = p.row()
            if len(train) < n_train and row["prompt"] not in seen_prompts:
                seen_prompts.add(row["prompt"])
                train.append(row)
    else:
        raise ValueError(
            f"could not draw {n_train} train and {n_held} held-out problems "
            f"(got {len(train)} and {len(held)}): make the task larger"
        )
    return train, held


_ANSWER = re.compile(r"Answer:")
_NUMBER = re.compile(r"\s*(-?\d+)")


def extract_answer(text: str):
    """The integer after the last "Answer:" in `text`, as a string; None if absent."""
    if not text:
        return None
    last = None
    for m in _ANSWER.finditer(text):
        last = m
    if last is None:
        return None
    num = _NUMBER.match(text, last.end())
    if num is None:
        return None
    return str(int(num.group(1)))


def is_correct(generated_text: str, reference_completion: str) -> bool:
    """True when both texts carry an answer and the answers are equal."""
    got = extract_answer(generated_text)
    want = extract_answer(reference_completion)
    return got is not None and want is not None and got == want


def write_jsonl(rows, path) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
