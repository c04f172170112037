"""Four-number sums: the sums task sized so that a small student can learn it.

The three styles of working of :mod:`hpd.tasks.sums` (forward, backward, pairs), with four
numbers instead of six::

    prompt:    "Sum a=7 b=3 c=9 d=4\\n"
    forward:   "a: 7\\nb: 7+3=10\\nc: 10+9=19\\nd: 19+4=23\\nAnswer: 23"
    backward:  "d: 4\\nc: 4+9=13\\nb: 13+3=16\\na: 16+7=23\\nAnswer: 23"
    pairs:     "a+b = 7+3 = 10\\nc+d = 9+4 = 13\\n10+13 = 23\\nAnswer: 23"

Answers are still long (35 to 42 tokens with the shipped tokenizer, at least 31 before
``Answer:``), the teacher still writes two styles and the data a third; what changes is
that a student a third of the teacher's size can learn the data's style, so methods can be
told apart by how far they get rather than by how they fail (docs/evidence.md).

The split has three parts that share no list of numbers: training problems, a validation
set that only chooses learning rates, and a test set that only the final table reads.
Pure Python; paths point at the shipped assets in ``hpd/assets/sums4``.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpd.tasks import sums

DIFFICULTY = {"count": 4, "value_range": (1, 9)}
TEACHER_MIX = {"forward": 0.45, "backward": 0.45, "pairs": 0.10}  # two modes; reads the third
STUDENT_MIX = {"forward": 1 / 3, "backward": 1 / 3, "pairs": 1 / 3}  # the raw student's brief start

SUMS4_DIR = Path(__file__).resolve().parent.parent / "assets" / "sums4"
TEACHER_DIR = SUMS4_DIR / "teacher"
EXPERT_DIR = SUMS4_DIR / "expert"  # the teacher also trained to continue mixed-style workings
STUDENT_DIR = SUMS4_DIR / "student"
TEACHERS = {"teacher": TEACHER_DIR, "expert": EXPERT_DIR}
MANIFEST_PATH = SUMS4_DIR / "manifest.json"
SPLITS = {
    "train": "train.jsonl",  # distillation data: pairs-style reference solutions
    "train_teacher": "train_teacher.jsonl",  # the same prompts answered by the teacher (T=1): a control
    "val": "val.jsonl",  # chooses learning rates
    "test": "test.jsonl",  # the final table only
    "test_teacher": "test_teacher.jsonl",  # test prompts answered by the teacher, for KL on its text
    "train_expert": "train_expert.jsonl",  # the data's prompts answered by the expert teacher (T=1)
    "test_expert": "test_expert.jsonl",  # test prompts answered by the expert teacher
    "prefixes": "prefixes.jsonl",  # students' answers to test prompts, cut once each (recovery)
}


def make_splits(seed: int, n_train: int, n_val: int, n_test: int):
    """(train, val, test) lists of distinct problems; no list of numbers is in two of them.

    Validation and test are the held-out part of :func:`hpd.tasks.sums.make_split`, cut in
    two, so neither depends on how many training problems are drawn."""
    train, held = sums.make_split(seed, n_train, n_val + n_test, **DIFFICULTY)
    return train, held[:n_val], held[n_val:]


def path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return SUMS4_DIR / SPLITS[split]


def load_rows(split: str) -> list:
    return sums.read_jsonl(path(split))


def load_manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
