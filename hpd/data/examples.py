"""Data: tokenising with a loss mask, truncation, batching (files are read by hpd.sources).

Rows are (after hpd.formats has brought ShareGPT and Alpaca rows to these) one of
    {"messages": [{"role": ..., "content": ...}, ...]}  loss on assistant turns
    {"prompt": ..., "completion": ...}                  loss on the completion
    {"text": ...}                                       loss on every token
A bad row stops everything before training, with `file:line` and what is wrong.
Batches are numpy arrays; a backend turns them into its own arrays.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100


class DataError(ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[i]: token i is a target (predicted from tokens < i)
    prompt_len: int  # tokens before the first target (the prompt, for rollouts)


@dataclass
class Dataset:
    path: str
    examples: list[Example]
    truncated: int = 0
    rows: int = 0
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def target_tokens(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; a bad line raises DataError with file:line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data file {path} is a folder; pass a JSONL file")
    rows = []
    with open(path, "rb") as fh:  # bytes, so that a bad byte is reported with its line
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def row_kind(row: dict) -> str:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f'messages[{i}] must be an object with string "role" and "content"')
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("messages has no assistant turn to learn from")
        for i, m in enumerate(msgs):  # as an empty "completion" is
            if m["role"] == "assistant" and not m["content"]:
                raise ValueError(f'messages[{i}]: the assistant "content" is empty')
        return "messages"
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise ValueError(f'"{key}" must be a string')
        if not row["completion"]:
            raise ValueError('"completion" is empty')
        return "prompt"
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise ValueError('"text" must be a non-empty string')
        return "text"
    raise ValueError(f'expected a "messages", "prompt"/"completion" or "text" field; got keys {sorted(row)}')


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if isinstance(ids, dict):  # some versions ignore return_dict=False
        ids = ids["input_ids"]
    return list(ids)


def encode_row(row: dict, tokenizer) -> Example:
    """Token ids and loss mask for one row (not truncated)."""
    kind = row_kind(row)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; set one in its tokenizer_config.json")
    if kind == "messages":
        return _encode_messages(row["messages"], tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if kind == "prompt":
        prompt = bos + _encode(tokenizer, row["prompt"])
        completion = _encode(tokenizer, row["completion"]) + [eos]
        return Example(prompt + completion, [False] * len(prompt) + [True] * len(completion), len(prompt))
    ids = bos + _encode(tokenizer, row["text"]) + [eos]
    mask = [False] * len(bos) + [True] * (len(ids) - len(bos))
    return Example(ids, mask, len(bos) or 1)


def _encode_messages(messages, tokenizer) -> Example:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError('the tokenizer has no chat template, so "messages" rows cannot be rendered')
    ids = _chat_ids(tokenizer, messages)
    mask = [False] * len(ids)
    first_target = None
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _chat_ids(tokenizer, messages[: i + 1])
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise DataError("the chat template does not render conversations as growing prefixes; "
                            "use prompt/completion rows instead")
        for j in range(len(before), len(through)):
            mask[j] = True
        first_target = len(before) if first_target is None else first_target
    return Example(ids, mask, first_target or 1)


def load_dataset(path: str | Path, tokenizer, max_length: int, *, split: str = "", columns=None,
                 default_splits: tuple[str, ...] = ("train",)) -> Dataset:
    """Every row encoded and truncated to max_length; raises DataError on any bad row.
    The file kinds and row shapes read are those of hpd.sources and hpd.formats."""
    from hpd.sources import read_rows

    examples, truncated = [], 0
    rows = read_rows(path, split=split, columns=columns, default_splits=default_splits)
    for where, row in rows:
        try:
            ex = encode_row(row, tokenizer)
        except ValueError as e:  # DataError included
            raise DataError(f"{where}: {e}") from None
        if len(ex.input_ids) > max_length:
            truncated += 1
            ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length], min(ex.prompt_len, max_length))
        if any(ex.loss_mask[1:]):
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no row has a trainable token (after truncation to {max_length} tokens)")
    return Dataset(str(path), examples, truncated=truncated, rows=len(rows))


def collate(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (B, L) arrays; targets[b, t] is the token that logits[b, t] must predict."""
    length = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    attention = np.zeros((b, length), dtype=np.int64)
    targets = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    prompt_lens = np.zeros((b,), dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = e.input_ids
        attention[i, :n] = 1
        ids, mask = np.asarray(e.input_ids), np.asarray(e.loss_mask, dtype=bool)
        targets[i, : n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        prompt_lens[i] = e.prompt_len
    return {"input_ids": input_ids, "attention_mask": attention, "targets": targets, "prompt_lens": prompt_lens}


class Batches:
    """Micro-batches in a seeded order per epoch, resumable from (epoch, index).

    With several processes, each rank takes every world_size-th micro-batch, so no row
    is seen twice in an epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, pad_id: int, *, seed: int = 0,
                 group_by_length: bool = False, rank: int = 0, world_size: int = 1, packing: bool = False):
        if len(dataset) < batch_size * world_size:
            raise DataError(
                f"{dataset.path}: {len(dataset)} usable rows, fewer than one batch "
                f"({batch_size} x {world_size} processes); lower --batch-size"
            )
        self.dataset, self.batch_size, self.pad_id = dataset, batch_size, pad_id
        self.seed, self.group_by_length = seed, group_by_length
        self.rank, self.world_size = rank, world_size
        self.packing = packing  # rows concatenated into few sequences (hpd.packing)
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        idx = list(range(len(self.dataset)))
        rng.shuffle(idx)
        size = self.batch_size
        if self.group_by_length:
            # sort within windows of 50 batches, then shuffle the batches
            window = size * 50
            lens = [len(e.input_ids) for e in self.dataset.examples]
            idx = [i for w in range(0, len(idx), window) for i in sorted(idx[w:w + window], key=lens.__getitem__)]
        batches = [idx[i:i + size] for i in range(0, len(idx) - size + 1, size)]
        if self.group_by_length:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        ids = self._order[self.index * self.world_size + self.rank]
        self.index += 1
        examples = [self.dataset.examples[i] for i in ids]
        if self.packing:
            from hpd.packing import collate_packed

            return collate_packed(examples, self.pad_id, rows=ids)
        batch = collate(examples, self.pad_id)
        # rows' places in the dataset: keys of split-invariant draws and of the teacher store
        batch["rows"] = np.asarray(ids, dtype=np.int64)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


def check_tokenizers(teacher_tok, student_tok) -> None:
    """Teacher and student must share a tokenizer: same vocabulary and special tokens."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv.items()) - set(sv.items()))
        only_s = len(set(sv.items()) - set(tv.items()))
        raise ValueError(
            f"teacher and student tokenizers differ: {len(tv)} vs {len(sv)} tokens, "
            f"{only_t} entries only in the teacher's and {only_s} only in the student's; "
            "distillation needs one shared tokenizer"
        )
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if a != b:
            raise ValueError(f"teacher and student tokenizers differ in {name}: {a} vs {b}")


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id
