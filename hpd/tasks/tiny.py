"""The embedded tiny teacher, student and arithmetic data (``hpd/assets/tiny``).

Paths, the sequence format the tiny models were trained with, and a greedy
exact-match evaluation. Torch and transformers are imported only inside the
functions that need them.

Sequence format (training and evaluation alike)::

    ids = [bos] + encode(prompt) + encode(completion) + [eos]

with ``encode(..., add_special_tokens=False)``; the loss covers the completion
tokens and the eos. Greedy evaluation feeds ``[bos] + encode(prompt)`` and
generates until eos.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpd.tasks.arith import is_correct, read_jsonl

TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TEACHER_DIR = TINY_DIR / "teacher"
STUDENT_DIR = TINY_DIR / "student"
TRAIN_PATH = TINY_DIR / "train.jsonl"
HELD_PATH = TINY_DIR / "held.jsonl"
MANIFEST_PATH = TINY_DIR / "manifest.json"

IGNORE_INDEX = -100


def load_manifest() -> dict:
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return json.load(f)


def load_rows(split: str = "held") -> list:
    return read_jsonl({"train": TRAIN_PATH, "held": HELD_PATH}[split])


def encode_example(tok, prompt: str, completion: str):
    """(input_ids, labels) in hpd's data format; labels are IGNORE_INDEX on bos and the prompt."""
    from hpd.data.examples import encode_row

    ex = encode_row({"prompt": prompt, "completion": completion}, tok)
    return ex.input_ids, [t if m else IGNORE_INDEX for t, m in zip(ex.input_ids, ex.loss_mask)]


def prompt_ids(tok, prompt: str) -> list:
    from hpd.data.examples import prompt_ids as row_prompt_ids

    return row_prompt_ids({"prompt": prompt}, tok)[0]


def greedy_generate(model, tok, prompts, max_new_tokens: int = 64, batch_size: int = 64) -> list:
    """Greedy completions (decoded text, eos excluded) of a torch causal LM, through the
    torch backend's generation."""
    from types import SimpleNamespace

    from hpd.backends.torch import TorchBackend

    backend = TorchBackend(SimpleNamespace(device="cpu"))
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tok, p) for p in prompts[start:start + batch_size]]
        for row in backend.generate(model, tok, chunk, max_new_tokens=max_new_tokens, greedy=True):
            texts.append(tok.decode([t for t in row if t != tok.eos_token_id], skip_special_tokens=True))
    return texts


def greedy_accuracy(model, tok, rows, max_new_tokens: int = 64, batch_size: int = 64) -> float:
    """Held-out exact match: the fraction of rows whose greedy answer is right."""
    texts = greedy_generate(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    hits = sum(is_correct(t, r["completion"]) for t, r in zip(texts, rows))
    return hits / max(len(rows), 1)
