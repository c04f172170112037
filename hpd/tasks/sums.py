"""Summing lettered numbers in several valid orders: a task on which distillation methods differ.

A prompt names a few one-digit numbers by letter; a completion adds them up, one line per
intermediate result, and ends with ``Answer: N``. Three valid styles of working exist::

    prompt:    "Sum a=7 b=3 c=9 d=4 e=8 f=6\\n"

    forward:   "a: 7\\nb: 7+3=10\\nc: 10+9=19\\nd: 19+4=23\\ne: 23+8=31\\nf: 31+6=37\\nAnswer: 37"
    backward:  "f: 6\\ne: 6+8=14\\nd: 14+4=18\\nc: 18+9=27\\nb: 27+3=30\\na: 30+7=37\\nAnswer: 37"
    pairs:     "a+b = 7+3 = 10\\nc+d = 9+4 = 13\\ne+f = 8+6 = 14\\n10+13 = 23\\n23+14 = 37\\nAnswer: 37"

The teacher writes ``forward`` or ``backward`` (its two modes, chosen per answer, not per
prompt) and reads ``pairs``; the distillation data is written in ``pairs``, the style of
a reference solution that is valid but not the teacher's (see docs/when-hpd-helps.md).

Pure Python (no torch, no mlx), seeded with ``random.Random(seed)``. :func:`make_split`
gives a deterministic train / held-out split in which no held-out list of numbers occurs
in training.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from hpd.tasks.arith import extract_answer, is_correct, read_jsonl, write_jsonl

__all__ = [
    "STYLES",
    "Problem",
    "sample_problem",
    "generate",
    "make_split",
    "style_of",
    "opening_of",
    "extract_answer",
    "is_correct",
    "read_jsonl",
    "write_jsonl",
]

STYLES = ("forward", "backward", "pairs")
LETTERS = "abcdefghij"

DEFAULTS = dict(
    count=6,  # how many numbers a prompt names (2..10)
    value_range=(1, 9),  # each number
)


@dataclass(frozen=True)
class Problem:
    values: tuple  # the numbers, in the prompt's order

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.values)]

    @property
    def answer(self) -> int:
        return sum(self.values)

    @property
    def signature(self) -> str:
        return " ".join(map(str, self.values))

    def prompt(self) -> str:
        return "Sum " + " ".join(f"{letter}={v}" for letter, v in zip(self.letters, self.values)) + "\n"

    def completion(self, style: str) -> str:
        if style == "forward":
            lines = self._running(range(len(self.values)))
        elif style == "backward":
            lines = self._running(reversed(range(len(self.values))))
        elif style == "pairs":
            lines = self._pairs()
        else:
            raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
        return "\n".join(lines + [f"Answer: {self.answer}"])

    def completions(self) -> dict:
        """Every style's completion (two styles can coincide, e.g. for a palindromic list)."""
        return {s: self.completion(s) for s in STYLES}

    def row(self, style: str) -> dict:
        return {"prompt": self.prompt(), "completion": self.completion(style), "style": style}

    def _running(self, order) -> list:
        order = list(order)
        first = order[0]
        total = self.values[first]
        lines = [f"{self.letters[first]}: {total}"]
        for i in order[1:]:
            v = self.values[i]
            lines.append(f"{self.letters[i]}: {total}+{v}={total + v}")
            total += v
        return lines

    def _pairs(self) -> list:
        lines, partial = [], []
        for i in range(0, len(self.values), 2):
            if i + 1 < len(self.values):
                a, b = self.values[i], self.values[i + 1]
                lines.append(f"{self.letters[i]}+{self.letters[i + 1]} = {a}+{b} = {a + b}")
                partial.append(a + b)
            else:  # an odd count leaves the last number alone
                lines.append(f"{self.letters[i]} = {self.values[i]}")
                partial.append(self.values[i])
        total = partial[0]
        for p in partial[1:]:
            lines.append(f"{total}+{p} = {total + p}")
            total += p
        return lines


def _knobs(difficulty: dict) -> dict:
    unknown = set(difficulty) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown difficulty knob(s): {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    k = {**DEFAULTS, **difficulty}
    if not 2 <= k["count"] <= len(LETTERS):
        raise ValueError(f"need 2 <= count <= {len(LETTERS)}")
    lo, hi = k["value_range"]
    if not 0 <= lo <= hi <= 9:
        raise ValueError("need 0 <= value_range <= 9 (one-digit numbers)")
    return k


def sample_problem(rng: random.Random, **difficulty) -> Problem:
    k = _knobs(difficulty)
    return Problem(tuple(rng.randint(*k["value_range"]) for _ in range(k["count"])))


def pick_style(rng: random.Random, mix: dict) -> str:
    """A style drawn with the probabilities in `mix` ({style: weight})."""
    styles = [s for s in STYLES if mix.get(s, 0) > 0]
    if not styles or set(mix) - set(STYLES):
        raise ValueError(f"a style mix needs positive weights on some of {STYLES}, got {mix}")
    return rng.choices(styles, weights=[mix[s] for s in styles])[0]


def generate(seed: int, n: int, mix: dict | None = None, **difficulty) -> list:
    """`n` rows, each in a style drawn from `mix` (default: pairs only); duplicates possible."""
    rng = random.Random(seed)
    mix = mix or {"pairs": 1.0}
    return [sample_problem(rng, **difficulty).row(pick_style(rng, mix)) for _ in range(n)]


def _is_held(signature: str, held_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:8], "big")
    return (h % 1_000_000) < held_fraction * 1_000_000


def make_split(seed: int, n_train: int, n_held: int, held_fraction: float = 0.1, **difficulty):
    """Deterministic (train_problems, held_problems), lists of distinct :class:`Problem`.

    The list of numbers is hashed; a fixed `held_fraction` of lists is reserved for the
    held-out set, so a held-out list never occurs in training, whatever the style. Raises
    when the difficulty leaves too few distinct lists."""
    _knobs(difficulty)
    rng = random.Random(seed)
    train, held, seen = [], [], set()
    for _ in range(50 * (n_train + n_held) + 10_000):
        if len(train) >= n_train and len(held) >= n_held:
            break
        p = sample_problem(rng, **difficulty)
        if p.signature in seen:
            continue
        if _is_held(p.signature, held_fraction):
            if len(held) < n_held:
                seen.add(p.signature)
                held.append(p)
        elif len(train) < n_train:
            seen.add(p.signature)
            train.append(p)
    else:
        raise ValueError(f"could not draw {n_train} train and {n_held} held-out problems "
                         f"(got {len(train)} and {len(held)}): make the task larger")
    return train, held


_PROMPT = re.compile(r"^Sum ((?:[a-j]=\d )*[a-j]=\d)\n$")


def parse_prompt(prompt: str) -> Problem:
    """The problem a prompt states (raises ValueError if it is not one of this task's)."""
    m = _PROMPT.match(prompt)
    if not m:
        raise ValueError(f"not a sums prompt: {prompt!r}")
    pairs = [item.split("=") for item in m.group(1).split(" ")]
    if "".join(letter for letter, _ in pairs) != LETTERS[: len(pairs)]:
        raise ValueError(f"letters out of order: {prompt!r}")
    return Problem(tuple(int(v) for _, v in pairs))


def style_of(prompt: str, text: str) -> str | None:
    """Which style `text` is, exactly and in full, for this prompt; None when it is none of them
    (a wrong step, a skipped number, a mix of styles). Forward wins a tie with backward."""
    problem = parse_prompt(prompt)
    text = text.strip()
    for style in STYLES:
        if text == problem.completion(style):
            return style
    return None


def opening_of(prompt: str, text: str) -> str | None:
    """The style an answer starts in, from the shape of its first line, right numbers or not:
    ``a: N`` forward, ``<last letter>: N`` backward, ``a+b = ...`` pairs; None for anything
    else. With `style_of` it tells an answer that starts in one style and goes on in another."""
    letters = parse_prompt(prompt).letters
    first = text.strip().split("\n", 1)[0]
    if re.fullmatch(rf"{letters[0]}: \d+", first):
        return "forward"
    if re.fullmatch(rf"{letters[-1]}: \d+", first):
        return "backward"
    if first.startswith(f"{letters[0]}+{letters[1]} = "):
        return "pairs"
    return None
