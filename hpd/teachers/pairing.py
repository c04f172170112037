"""Each data row rendered by both tokenizers, and its student targets paired with teacher positions.

The student's encoding of a row is what `hpd.data` makes of it (the batches train on
it). The teacher renders the same row its own way: its own chat template for a
conversation, its own BOS and EOS around a prompt and completion. Only the responses
are aligned (the targets: assistant turns, the completion, a text row's text); the
prompts may differ as the two templates differ.

For each response the two sides' token offsets into their rendered texts are cut to
the response's own text (its window, where the content sits in each rendering: the
whole segment where both render it alike) and aligned by `hpd.teachers.align.align_spans`.
A student target is paired with the teacher position that has read the same response
text before it, when the teacher's own next token there is the student's data token
(the same bytes, a shared pair; EOS pairs EOS by role): then the teacher's row scores
the data token and every other shared one-token continuation as the student's does.
A target inside a group of tokens (the other side has no cut there), one whose group
starts with different tokens on the two sides (student 'Ġi' + 's', teacher '▁is': the
teacher's row would rate 'Ġi' as a non-canonical spelling), and one whose group's
first token reaches back into template text stay unpaired.

A row is refused (`PairingError`, naming it) when a template does not render the
response's text, or when a side's tokens do not spell it (an unknown token, a
normalizer): the two models would then read different text. Cost: one more
tokenisation of each row per side (with offsets) and `align_spans`, linear in the
row's length; done once per example before training (`hpd.teachers.cross`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpd.data.examples import Example, encode_row, row_kind
from hpd.teachers.align import align_spans, detect_convention, token_bytes


class PairingError(ValueError):
    """A row the two tokenizers cannot be aligned on; the message names it."""


@dataclass
class Side:
    """One tokenizer's view of a row: its Example, each token's character span in the
    rendered text, and which tokens are specials (no text)."""

    example: Example
    text: str
    offsets: np.ndarray  # (n, 2)
    special: np.ndarray  # (n,) bool
    contents: list[str]  # the response texts, in order
    starts: list[int]  # for each response, where its content is searched from (-1: the segment's start)


@dataclass
class Paired:
    """A row's teacher tokens and the student targets that have a teacher position.

    student_pos[k]: a student target index i (its logits sit at i - 1); teacher_pos[k]:
    the teacher position whose logits predict the same next text (i's teacher row)."""

    teacher_ids: np.ndarray
    student_pos: np.ndarray
    teacher_pos: np.ndarray
    targets: int  # the student's target count (after truncation)


class Speller:
    """Each token id's bytes under its tokenizer's convention (None: a special), once per vocabulary."""

    def __init__(self, tokenizer):
        convention = detect_convention(tokenizer)
        specials = set(tokenizer.all_special_ids)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.bytes = [None if i in specials or t is None else token_bytes(t, convention)
                      for i, t in enumerate(tokens)]
        self.specials = specials

    def spell(self, ids) -> bytes:
        return b"".join(self.bytes[i] or b"" for i in ids if 0 <= i < len(self.bytes))


def _encode_with_offsets(tokenizer, text: str):
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # transformers' slow (Python) tokenizers give no offsets
        raise PairingError(f"{type(tokenizer).__name__} gives no character offsets; cross-tokenizer alignment "
                           "needs a fast tokenizer (tokenizer.json)") from None
    return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def render(row: dict, tokenizer, who: str) -> Side:
    """The row as `hpd.data` encodes it for this tokenizer, with character offsets."""
    kind = row_kind(row)
    try:
        ex = encode_row(row, tokenizer)
    except ValueError as e:
        raise PairingError(f"the {who}'s tokenizer: {e}") from None
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if kind == "messages":
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids, off = _encode_with_offsets(tokenizer, text)
        if ids != ex.input_ids:
            raise PairingError(f"the {who}'s chat template: its token ids are not those of its rendered text, "
                               "so they cannot be placed in it")
        contents = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        starts = [-1] * len(contents)
    else:
        prompt, body = (row["prompt"], row["completion"]) if kind == "prompt" else ("", row["text"])
        p_ids, p_off = _encode_with_offsets(tokenizer, prompt) if prompt else ([], np.zeros((0, 2), np.int64))
        b_ids, b_off = _encode_with_offsets(tokenizer, body)
        text = prompt + body
        ids = bos + p_ids + b_ids + [tokenizer.eos_token_id]
        none = np.zeros((len(bos), 2), np.int64)
        off = np.concatenate([none, p_off, b_off + len(prompt), np.zeros((1, 2), np.int64)])
        if ids != ex.input_ids:
            raise PairingError(f"the {who}'s tokenizer encodes the row differently with offsets")
        contents, starts = [body], [len(prompt)]
    special = np.isin(np.asarray(ids, dtype=np.int64), list(tokenizer.all_special_ids))
    return Side(ex, text, off, special, contents, starts)


def segments(mask) -> list[tuple[int, int]]:
    """[start, end) of each run of targets in a loss mask."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _window(side: Side, seg: tuple[int, int], k: int, who: str) -> tuple[int, int]:
    """The characters of response k inside the rendered segment."""
    a, b = seg
    kept = [j for j in range(a, b) if not side.special[j]]
    if not kept:
        return (0, 0)
    lo, hi = int(side.offsets[kept, 0].min()), int(side.offsets[kept, 1].max())
    content = side.contents[k]
    start = side.starts[k] if side.starts[k] >= 0 else side.text.find(content, lo, hi)
    if start < 0 or start + len(content) > hi:
        raise PairingError(f"the {who}'s rendering of response {k + 1} does not hold its text "
                           f"{_short(content)} (rendered: {_short(side.text[lo:hi])}); the templates disagree")
    return start, start + len(content)


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _local(side: Side, seg, window, speller: Speller, who: str, k: int):
    """Offsets of the segment's tokens relative to the window, with a leading context token:
    (offsets (n+1, 2), skip (n+1,), reaches_back (n+1,), tokens inside or across the window)."""
    a, b = seg
    w0, w1 = window
    off = side.offsets[a:b]
    inside = ~side.special[a:b] & (off[:, 1] > w0) & (off[:, 0] < w1)
    spelled = speller.spell([side.example.input_ids[j] for j in range(a, b) if inside[j - a]])
    if side.text[w0:w1].encode("utf-8") not in spelled:
        raise PairingError(f"the {who}'s tokens do not spell response {k + 1} {_short(side.text[w0:w1])} "
                           "(an unknown token or a normalizer): the models would read different text")
    local = np.clip(off, w0, w1) - w0
    skip = np.concatenate([[True], ~inside])
    back = np.concatenate([[False], inside & (off[:, 0] < w0)])
    return np.concatenate([[[0, 0]], local]), skip, back, np.flatnonzero(inside) + a


def pair_row(row: dict, student_tok, teacher_tok, spellers, teacher_id_of: np.ndarray, max_length: int) -> Paired:
    """The row's teacher tokens and paired positions; the student's side truncated to
    max_length as `hpd.data.batches.load_dataset` truncates it. teacher_id_of (V_s,): the
    teacher id of each student id's token, -1 where the teacher has none."""
    s, t = render(row, student_tok, "student"), render(row, teacher_tok, "teacher")
    s_seg, t_seg = segments(s.example.loss_mask), segments(t.example.loss_mask)
    if len(s_seg) != len(t_seg) or len(s_seg) != len(s.contents):
        raise PairingError(f"the student renders {len(s_seg)} response(s), the teacher {len(t_seg)}; "
                           "the templates disagree")
    pairs = []
    for k, (sg, tg) in enumerate(zip(s_seg, t_seg)):
        same = bool(_segment_text(s, sg)) and _segment_text(s, sg) == _segment_text(t, tg)
        sw = _span(s, sg) if same else _window(s, sg, k, "student")  # rendered alike: the whole segment
        tw = _span(t, tg) if same else _window(t, tg, k, "teacher")
        s_off, s_skip, s_back, s_in = _local(s, sg, sw, spellers[0], "student", k)
        t_off, t_skip, t_back, t_in = _local(t, tg, tw, spellers[1], "teacher", k)
        a = align_spans(s_off, t_off, student_skip=s_skip, teacher_skip=t_skip)
        target = a.student_target_to_teacher_position.copy()
        for (s0, _), (t0, _) in zip(a.student_ranges.tolist(), a.teacher_ranges.tolist()):
            if s_back[s0] or t_back[t0]:
                target[s0] = -1
        j = np.flatnonzero(target >= 0)
        pairs += list(zip((sg[0] + j - 1).tolist(), (tg[0] - 1 + target[j]).tolist()))
        pairs += _eos_pair(s, sg, s_in, student_tok, t, tg, t_in, teacher_tok)
    ids, t_ids = s.example.input_ids, t.example.input_ids
    n = min(len(ids), max_length)
    kept = [(i, p) for i, p in pairs if 1 <= i < n and 0 <= p < len(t_ids) - 1 and s.example.loss_mask[i]
            and teacher_id_of[ids[i]] == t_ids[p + 1]]
    student_pos = np.asarray([i for i, _ in kept], dtype=np.int64)
    teacher_pos = np.asarray([p for _, p in kept], dtype=np.int64)
    t_len = int(teacher_pos.max()) + 1 if len(kept) else 1
    return Paired(teacher_ids=np.asarray(t.example.input_ids[:t_len], dtype=np.int64), student_pos=student_pos,
                  teacher_pos=teacher_pos, targets=int(sum(s.example.loss_mask[1:n])))


def pair_identical(example: Example, max_length: int) -> Paired:
    """One tokenizer on both sides: every target i is taught by position i - 1 of the same ids."""
    n = min(len(example.input_ids), max_length)
    i = np.asarray([j for j in range(1, n) if example.loss_mask[j]], dtype=np.int64)
    return Paired(teacher_ids=np.asarray(example.input_ids[:n], dtype=np.int64), student_pos=i, teacher_pos=i - 1,
                  targets=len(i))


def _segment_text(side: Side, seg) -> str:
    a, b = _span(side, seg)
    return side.text[a:b]


def _span(side: Side, seg) -> tuple[int, int]:
    a, b = seg
    off = side.offsets[a:b][~side.special[a:b]]
    return (int(off[:, 0].min()), int(off[:, 1].max())) if len(off) else (0, 0)


def _eos_pair(s: Side, sg, s_in, s_tok, t: Side, tg, t_in, t_tok) -> list[tuple[int, int]]:
    """The student's EOS target after the response, paired with the teacher's EOS (by role),
    when each comes after every token of the response on its side."""
    def eos_at(side: Side, seg, inside, tok):
        found = [j for j in range(seg[0], seg[1]) if side.example.input_ids[j] == tok.eos_token_id]
        last = int(inside.max()) if len(inside) else -1
        return found[0] if found and found[0] > last else None

    i, j = eos_at(s, sg, s_in, s_tok), eos_at(t, tg, t_in, t_tok)
    return [(i, j - 1)] if i is not None and j is not None and j >= 1 else []


__all__ = ["PairingError", "Paired", "Speller", "pair_row", "pair_identical", "render", "segments"]
