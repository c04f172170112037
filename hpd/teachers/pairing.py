"""Each data row rendered by both tokenizers, and its student targets paired with teacher positions.

The student's encoding of a row is what `hpd.data` makes of it (the batches train on
it). The teacher renders the same row its own way: its own chat template for a
conversation, its own BOS and EOS around a prompt and completion. Only the responses
are aligned (the targets: assistant turns, the completion, a text row's text); the
prompts may differ as the two templates differ.

For each response the two sides' token offsets into their rendered texts are cut to
the response's own text (its window, where the content sits in each rendering) and
aligned by `hpd.teachers.align.align_spans`. Where both sides render the response's
segment alike (one template on both), the window is the whole segment, so the text after
an end token (ChatML's `<|im_end|>\n`) is aligned too. A marker, a special token that
stands for itself (an end token the template wrote, the EOS after a completion), spells
no text: it pairs with the other side's marker at the same place in the window.
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
from typing import NamedTuple

import numpy as np

from hpd.data.examples import Example, encode_row, row_kind
from hpd.teachers.align import align_spans, detect_convention, token_bytes


class PairingError(ValueError):
    """A row the two tokenizers cannot be aligned on; the message names it."""


@dataclass
class Side:
    """One tokenizer's view of a row: its Example, each token's character span in the
    rendered text, which tokens are specials (they spell no bytes) and which of those
    stand for themselves (an end token the template wrote, the EOS after a completion)
    rather than for text of the row they cannot read (an <unk>)."""

    example: Example
    text: str
    offsets: np.ndarray  # (n, 2)
    special: np.ndarray  # (n,) bool
    marker: np.ndarray  # (n,) bool
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
        end = np.full((1, 2), len(text), np.int64)  # EOS, read after the whole text
        off = np.concatenate([none, p_off, b_off + len(prompt), end])
        if ids != ex.input_ids:
            raise PairingError(f"the {who}'s tokenizer encodes the row differently with offsets")
        contents, starts = [body], [len(prompt)]
    special = np.isin(np.asarray(ids, dtype=np.int64), list(tokenizer.all_special_ids))
    names = tokenizer.convert_ids_to_tokens(ids)
    marker = special & np.asarray([text[a:b].strip() in ("", name) for (a, b), name in zip(off.tolist(), names)],
                                  dtype=bool).reshape(-1)
    return Side(ex, text, off, special, marker, contents, starts)


def segments(mask) -> list[tuple[int, int]]:
    """[start, end) of each run of targets in a loss mask."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


class Response(NamedTuple):
    """One side's response, as `align_spans` takes it: its segment's tokens with a context
    row in front (row r is token first + r - 1), offsets relative to the response's window."""

    first: int  # the segment's first token in the row
    offsets: np.ndarray  # (n + 1, 2) characters, clipped to the window
    skip: np.ndarray  # (n + 1,) the context row, specials, tokens outside the window
    reaches_back: np.ndarray  # (n + 1,) tokens that start before the window (template text)
    markers: dict[int, int]  # window characters read before a marker in it -> its index


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
        alike = bool(_segment_text(s, sg)) and _segment_text(s, sg) == _segment_text(t, tg)
        student = response(s, sg, k, spellers[0], "student", alike)
        teacher = response(t, tg, k, spellers[1], "teacher", alike)
        pairs += _text_pairs(student, teacher) + _marker_pairs(student, teacher)
    return _paired(pairs, s, t, teacher_id_of, max_length)


def response(side: Side, seg: tuple[int, int], k: int, speller: Speller, who: str, alike: bool) -> Response:
    """Response k of a side: its window is the whole segment where both sides render it
    alike (the text after an end token is then aligned too), else the response's own text.
    Refused when the side's tokens do not spell the window's text (its markers left out)."""
    a, b = seg
    w0, w1 = _span(side, seg) if alike else _window(side, seg, k, who)
    off, special, marker = side.offsets[a:b], side.special[a:b], side.marker[a:b]
    inside = ~special & (off[:, 1] > w0) & (off[:, 0] < w1)
    spelled = speller.spell([side.example.input_ids[j] for j in range(a, b) if inside[j - a]])
    if _text_without(side.text, (w0, w1), off[marker]).encode("utf-8") not in spelled:
        raise PairingError(f"the {who}'s tokens do not spell response {k + 1} {_short(side.text[w0:w1])} "
                           "(an unknown token or a normalizer): the models would read different text")
    places = {int(off[j, 0]) - w0: a + j for j in np.flatnonzero(marker & (off[:, 0] >= w0) & (off[:, 0] <= w1))}
    return Response(first=a, offsets=np.concatenate([[[0, 0]], np.clip(off, w0, w1) - w0]),
                    skip=np.concatenate([[True], ~inside]),
                    reaches_back=np.concatenate([[False], inside & (off[:, 0] < w0)]), markers=places)


def _text_pairs(student: Response, teacher: Response) -> list[tuple[int, int]]:
    """(student target, teacher position) where a group of tokens starts at a cut both sides
    share, unless its first token on either side reaches back into template text."""
    a = align_spans(student.offsets, teacher.offsets, student_skip=student.skip, teacher_skip=teacher.skip)
    target = a.student_target_to_teacher_position.copy()
    for (s0, _), (t0, _) in zip(a.student_ranges.tolist(), a.teacher_ranges.tolist()):
        if student.reaches_back[s0] or teacher.reaches_back[t0]:
            target[s0] = -1
    j = np.flatnonzero(target >= 0)
    return list(zip((student.first + j - 1).tolist(), (teacher.first - 1 + target[j]).tolist()))


def _marker_pairs(student: Response, teacher: Response) -> list[tuple[int, int]]:
    """A student marker target (the end token) and the teacher position before the
    teacher's marker at the same place: both have read the same window text."""
    return [(i, teacher.markers[c] - 1) for c, i in student.markers.items()
            if c in teacher.markers and teacher.markers[c] >= 1]


def _paired(pairs, s: Side, t: Side, teacher_id_of: np.ndarray, max_length: int) -> Paired:
    """The pairs kept: a student target within max_length whose teacher position's next
    token is the student's data token (its teacher id)."""
    ids, t_ids = s.example.input_ids, t.example.input_ids
    n = min(len(ids), max_length)
    kept = [(i, p) for i, p in pairs if 1 <= i < n and 0 <= p < len(t_ids) - 1 and s.example.loss_mask[i]
            and teacher_id_of[ids[i]] == t_ids[p + 1]]
    student_pos = np.asarray([i for i, _ in kept], dtype=np.int64)
    teacher_pos = np.asarray([p for _, p in kept], dtype=np.int64)
    t_len = int(teacher_pos.max()) + 1 if len(kept) else 1
    return Paired(teacher_ids=np.asarray(t_ids[:t_len], dtype=np.int64), student_pos=student_pos,
                  teacher_pos=teacher_pos, targets=int(sum(s.example.loss_mask[1:n])))


def pair_identical(example: Example, max_length: int) -> Paired:
    """One tokenizer on both sides: every target i is taught by position i - 1 of the same ids."""
    n = min(len(example.input_ids), max_length)
    i = np.asarray([j for j in range(1, n) if example.loss_mask[j]], dtype=np.int64)
    return Paired(teacher_ids=np.asarray(example.input_ids[:n], dtype=np.int64), student_pos=i, teacher_pos=i - 1,
                  targets=len(i))


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


def _segment_text(side: Side, seg) -> str:
    a, b = _span(side, seg)
    return side.text[a:b]


def _span(side: Side, seg) -> tuple[int, int]:
    """The characters from the segment's first text token to its last."""
    a, b = seg
    off = side.offsets[a:b][~side.special[a:b]]
    return (int(off[:, 0].min()), int(off[:, 1].max())) if len(off) else (0, 0)


def _text_without(text: str, window: tuple[int, int], cuts: np.ndarray) -> str:
    """The window's text less the characters of `cuts` (the markers' spans: they spell nothing)."""
    w0, w1 = window
    out, at = [], w0
    for c0, c1 in sorted(np.clip(cuts, w0, w1).tolist()):
        out.append(text[at:max(c0, at)])
        at = max(at, c1)
    return "".join(out) + text[at:w1]


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


__all__ = ["PairingError", "Paired", "Response", "Speller", "pair_row", "pair_identical", "render", "response",
           "segments"]
