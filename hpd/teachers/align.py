"""Cross-tokenizer distillation: where a teacher with another vocabulary can teach the student.

A teacher that cuts text differently predicts other tokens at other positions, so its
distributions cannot be compared with the student's position by position and id by id.
This module finds what can still be compared, in plain numpy (no torch, no mlx):

  align_spans    which student targets have a teacher position that predicts from the
                 same text, by merging tokens on both sides until they end together;
  shared_vocab   which tokens the two vocabularies share (same bytes once each
                 convention's space and byte markers are decoded), for an exact term.

Offsets are in characters of the text both tokenizers were given (what transformers'
fast tokenizers return with `return_offsets_mapping=True`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CONVENTIONS = ("byte_level", "sentencepiece", "plain")


# ----------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Alignment:
    """Groups of tokens covering the same text, and the teacher position for each target.

    student_ranges, teacher_ranges  (G, 2) half-open token index ranges, group g on each
        side; a range may hold skipped tokens only if one sits inside a group.
    char_spans  (G, 2) the text [start, end) of each group, in characters.
    student_target_to_teacher_position  (n_student,) for each student token t, the teacher
        position whose logits predict the same next text as the student's logits at t - 1
        (which predict token t); -1 where t is not aligned (see `align_spans`)."""

    student_ranges: np.ndarray
    teacher_ranges: np.ndarray
    char_spans: np.ndarray
    student_target_to_teacher_position: np.ndarray

    def __len__(self) -> int:
        return len(self.char_spans)


def _side(offsets, skip) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One side's group ends: (character offset of each cut, index of the token ending it,
    and for each index i the first kept token at or after i).

    A kept token ends a group when the next kept token starts at or after its end (it
    does not share a character with it) and ends beyond it (a zero-width token at that
    point joins this group). Tokens of one split character repeat or overlap their
    character's offsets, so they stay together."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if skip is None:
        skip = (off[:, 0] == 0) & (off[:, 1] == 0)
    skip = np.asarray(skip, dtype=bool)
    if skip.shape != (len(off),):
        raise ValueError(f"a skip mask of {skip.shape} for {len(off)} tokens")
    keep = np.flatnonzero(~skip)
    start, end = off[keep, 0], off[keep, 1]
    if np.any(end[1:] < end[:-1]):
        raise ValueError("token offsets must follow the text: ends go backwards")
    last = np.ones(len(keep), dtype=bool)
    last[:-1] = (start[1:] >= end[:-1]) & (end[1:] > end[:-1])
    index = np.where(skip, len(off), np.arange(len(off)))
    next_kept = np.minimum.accumulate(index[::-1])[::-1]
    return end[last], keep[last], next_kept


def align_spans(student_offsets, teacher_offsets, *, student_skip=None, teacher_skip=None) -> Alignment:
    """Align two tokenizations of one text, in time linear in their lengths.

    Offsets are (n, 2) character [start, end) per token. Skipped tokens carry no text
    and belong to no group: by default those with the empty span (0, 0) that transformers
    gives the special tokens its post-processor adds (BOS, EOS); pass `*_skip` masks
    (`return_special_tokens_mask=True`) to say so exactly. Each side is cut where a token
    ends without sharing a character with the next (`_side`); the cuts found on both sides
    (two pointers over two increasing lists) end the groups, so group g spans the same
    text on both sides. Text past the last common cut (one side truncated) is in no group.

    The rule. The student's logits at t - 1 predict token t. Student token t (the target)
    is aligned when it is the first kept token of a group; the group starts at a cut
    common to both sides, so the teacher side starts there too, and its predicting
    position is the token just before the group's first teacher token (a skipped token
    such as BOS included: it adds no text). Both positions have then read exactly the
    text before the group. Targets inside a group, and a group whose first token on
    either side is token 0 (nothing predicts it), are -1.

    Example: "x 12345", the student cuts x|Ġ123|45, the teacher (with a BOS) BOS|▁x|▁1|2345.

        student  x(0,1) Ġ123(1,5) 45(5,7)            cuts 1, 5, 7
        teacher  BOS(0,0) ▁x(0,1) ▁1(1,3) 2345(3,7)  cuts 1, 3, 7 (BOS skipped)
        groups   [x]/[▁x] over "x";  [Ġ123 45]/[▁1 2345] over " 12345"
        student_target_to_teacher_position = [-1, 1, -1]

    Ġ123 (student 1, predicted by the student at 0 after "x") is taught by teacher
    position 1 (▁x, which has read BOS + "x"); 45 is inside a group, x has no predictor.

    Leading spaces: an offset that includes a word's space (Ġ, ▁) and one that excludes
    it end at the same place, so both cut alike. Offsets trimmed by a ByteLevel
    post-processor (trim_offsets=True) give whitespace-only tokens empty spans; they
    still cut at their end, except one at the very start of the text, which reads (0, 0)
    and needs the special-token mask to be told apart from a special."""
    s_cut, s_last, s_next = (a.tolist() for a in _side(student_offsets, student_skip))
    t_cut, t_last, t_next = (a.tolist() for a in _side(teacher_offsets, teacher_skip))

    groups, spans = [], []
    i = j = 0
    s_from, t_from, text_from = 0, 0, 0  # where the next group starts: tokens, text
    while i < len(s_cut) and j < len(t_cut):
        if s_cut[i] < t_cut[j]:
            i += 1
        elif t_cut[j] < s_cut[i]:
            j += 1
        else:
            s_to, t_to = s_last[i] + 1, t_last[j] + 1
            groups.append((s_next[s_from], s_to, t_next[t_from], t_to))
            spans.append((text_from, s_cut[i]))
            s_from, t_from, text_from = s_to, t_to, s_cut[i]
            i += 1
            j += 1

    n_student = len(s_next)
    g = np.asarray(groups, dtype=np.int64).reshape(-1, 4)
    target = np.full(n_student, -1, dtype=np.int64)
    ok = (g[:, 0] >= 1) & (g[:, 2] >= 1)
    target[g[ok, 0]] = g[ok, 2] - 1
    return Alignment(student_ranges=g[:, :2], teacher_ranges=g[:, 2:],
                     char_spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
                     student_target_to_teacher_position=target)


# ----------------------------------------------------------------------- shared vocabulary


@dataclass(frozen=True)
class SharedVocab:
    """Tokens both vocabularies hold: student_ids[i] and teacher_ids[i] are the same bytes
    (the EOS pair by role), in increasing student id."""

    student_ids: np.ndarray
    teacher_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.student_ids)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character.

    Bytes that are printable and not whitespace in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ')
    stand for themselves; the other 68, in byte order, take the characters from U+0100
    on, which is why a space is 'Ġ' (U+0120) and a newline 'Ċ' (U+010A)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(token: str, convention: str) -> bytes:
    """The bytes a vocabulary entry stands for.

    byte_level     each character is one byte of GPT-2's alphabet; an entry with a
                   character outside it (an added token kept as written) is its UTF-8.
    sentencepiece  '<0xNN>' is the byte NN; otherwise '▁' is a space.
    plain          the entry's UTF-8."""
    if convention == "byte_level":
        inv = _unicode_to_byte()
        try:
            return bytes(inv[c] for c in token)
        except KeyError:
            return token.encode("utf-8")
    if convention == "sentencepiece":
        m = _BYTE_PIECE.match(token)
        return bytes([int(m.group(1), 16)]) if m else token.replace("▁", " ").encode("utf-8")
    if convention == "plain":
        return token.encode("utf-8")
    raise ValueError(f"unknown tokenizer convention {convention!r}; one of {CONVENTIONS}")


def _types(node) -> list[str]:
    """Every component type in a tokenizer.json node (Sequences opened) and, for Replace
    and Prepend normalizers, what they write."""
    if not isinstance(node, dict):
        return []
    out = [node.get("type", "")]
    if node.get("type") in ("Replace", "Prepend"):
        out.append(json.dumps(node, ensure_ascii=False))
    for key in ("decoders", "pretokenizers", "normalizers"):
        for child in node.get(key) or []:
            out += _types(child)
    return out


def detect_convention(tokenizer=None, vocab: dict | None = None) -> str:
    """'byte_level', 'sentencepiece' or 'plain', from the tokenizer's own description.

    `tokenizer` is a transformers fast tokenizer (its `backend_tokenizer`), a `tokenizers`
    Tokenizer, or the parsed tokenizer.json. A ByteLevel decoder or pre-tokenizer means
    byte_level; Metaspace, ByteFallback, a normalizer writing '▁' or a byte-fallback
    model means sentencepiece. Otherwise (or with only a vocabulary) a heuristic on the
    vocabulary: more entries starting with '▁' than with 'Ġ', or '<0x00>' present, is
    sentencepiece; any 'Ġ' entry is byte_level; else plain."""
    spec = tokenizer
    if hasattr(spec, "backend_tokenizer"):
        spec = spec.backend_tokenizer
    if hasattr(spec, "to_str"):
        spec = json.loads(spec.to_str())
    if isinstance(spec, dict):
        kinds = _types(spec.get("decoder")) + _types(spec.get("pre_tokenizer"))
        if "ByteLevel" in kinds:
            return "byte_level"
        kinds += _types(spec.get("normalizer"))
        if ({"Metaspace", "ByteFallback"} & set(kinds) or any("▁" in k for k in kinds)
                or (spec.get("model") or {}).get("byte_fallback")):
            return "sentencepiece"
        vocab = vocab or (spec.get("model") or {}).get("vocab")
    if vocab is None and hasattr(tokenizer, "get_vocab"):
        vocab = tokenizer.get_vocab()
    if not isinstance(vocab, dict):
        return "plain"
    meta = sum(t.startswith("▁") for t in vocab)
    g = sum(t.startswith("Ġ") for t in vocab)
    if (meta and meta > g) or "<0x00>" in vocab:
        return "sentencepiece"
    return "byte_level" if g else "plain"


def _by_bytes(vocab: dict, convention: str, exclude: set) -> dict[bytes, int]:
    """bytes -> id; where entries collide, a regular piece beats a '<0xNN>' one (the
    tokenizer only falls back to bytes for what it has no piece for), then the lower id."""
    out, rank = {}, {}
    for tok, i in vocab.items():
        if i in exclude:
            continue
        b = token_bytes(tok, convention)
        r = (convention == "sentencepiece" and bool(_BYTE_PIECE.match(tok)), i)
        if b and (b not in rank or r < rank[b]):
            out[b], rank[b] = i, r
    return out


def shared_vocab(student_vocab: dict, teacher_vocab: dict, *, student_convention: str = "auto",
                 teacher_convention: str = "auto", student_special_ids=(), teacher_special_ids=(),
                 student_eos_id: int | None = None, teacher_eos_id: int | None = None) -> SharedVocab:
    """Pair the tokens of two `get_vocab()` dicts that stand for the same bytes.

    Each entry is decoded under its tokenizer's convention (`token_bytes`; 'auto' uses
    `detect_convention`'s vocabulary heuristic), so 'Ġthe' pairs '▁the', 'Ċ' pairs
    '<0x0A>', and a byte-level half character pairs its '<0xNN>'. Special ids take no
    part, except that the two EOS ids, when given, are paired by their role."""
    sc = detect_convention(vocab=student_vocab) if student_convention == "auto" else student_convention
    tc = detect_convention(vocab=teacher_vocab) if teacher_convention == "auto" else teacher_convention
    s = _by_bytes(student_vocab, sc, set(student_special_ids))
    t = _by_bytes(teacher_vocab, tc, set(teacher_special_ids))
    pairs = [(i, t[b]) for b, i in s.items() if b in t]
    if student_eos_id is not None and teacher_eos_id is not None:
        pairs = [p for p in pairs if p[0] != student_eos_id and p[1] != teacher_eos_id]
        pairs.append((student_eos_id, teacher_eos_id))
    pairs.sort()
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return SharedVocab(student_ids=arr[:, 0], teacher_ids=arr[:, 1])


def shared_vocab_from_tokenizers(student_tokenizer, teacher_tokenizer) -> SharedVocab:
    """`shared_vocab` for two transformers tokenizers: their vocabularies, special ids,
    EOS ids and detected conventions."""
    return shared_vocab(
        student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab(),
        student_convention=detect_convention(student_tokenizer),
        teacher_convention=detect_convention(teacher_tokenizer),
        student_special_ids=student_tokenizer.all_special_ids,
        teacher_special_ids=teacher_tokenizer.all_special_ids,
        student_eos_id=student_tokenizer.eos_token_id, teacher_eos_id=teacher_tokenizer.eos_token_id)
