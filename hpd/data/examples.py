"""Data: tokenising with a loss mask, truncation, batching (files are read by hpd.data.sources).

Rows are (after hpd.data.formats has brought ShareGPT and Alpaca rows to these) one of
    {"messages": [{"role": ..., "content": ...}, ...]}  loss on assistant turns
    {"prompt": ..., "completion": ...}                  loss on the completion
    {"text": ...}                                       loss on every token
A bad row stops everything before training, with `file:line` and what is wrong.
Batches are numpy arrays; a backend turns them into its own arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IGNORE_INDEX = -100


class DataError(ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[i]: token i is a target (predicted from tokens < i)
    prompt_len: int  # tokens before the first target (the prompt, for rollouts)
    route: int = -1  # the teacher that scores the row, among the run's named ones (hpd.data.routing)


@dataclass
class Dataset:
    path: str
    examples: list[Example]
    truncated: int = 0
    rows: int = 0
    stats: dict = field(default_factory=dict)
    where: list[str] = field(default_factory=list)  # each example's source row (file:line), for messages

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


def check_tokenizers(teacher_tok, student_tok) -> None:
    """Teacher and student must share a tokenizer: same vocabulary and special tokens."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv.items()) - set(sv.items()))
        only_s = len(set(sv.items()) - set(tv.items()))
        raise ValueError(
            f"teacher and student tokenizers differ: {len(tv)} vs {len(sv)} tokens, "
            f"{only_t} entries only in the teacher's and {only_s} only in the student's"
        )
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if a != b:
            raise ValueError(f"teacher and student tokenizers differ in {name}: {a} vs {b}")


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def prompt_ids(row: dict, tokenizer) -> tuple[list[int], list[dict] | str]:
    """Prompt token ids of a data row, and what to write back before the response."""
    kind = row_kind_for_prompt(row)
    if kind == "messages":
        msgs = row["messages"]
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return _chat_ids(tokenizer, msgs, add_generation_prompt=True), msgs
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _encode(tokenizer, row["prompt"]), row["prompt"]


def row_kind_for_prompt(row: dict) -> str:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or msgs[0].get("role") is None:
            raise ValueError('"messages" must be a non-empty list of {role, content}')
        return "messages"
    if isinstance(row.get("prompt"), str):
        return "prompt"
    raise ValueError('expected a "prompt" string or a "messages" list')
