"""Cross-tokenizer alignment and shared vocabulary (hpd.teachers.align)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hpd.teachers.align import (align_spans, byte_to_unicode, detect_convention, shared_vocab,
                                shared_vocab_from_tokenizers, token_bytes)
from tokenizer_pair import ALPHABET, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tokenizer_pair"))


def groups(a):
    """[(student range, teacher range, char span)] as plain tuples."""
    return [(tuple(s), tuple(t), tuple(c)) for s, t, c in
            zip(a.student_ranges.tolist(), a.teacher_ranges.tolist(), a.char_spans.tolist())]


def encode(tok, text):
    e = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    return e["input_ids"], e["offset_mapping"], np.asarray(e["special_tokens_mask"], dtype=bool)


# ------------------------------------------------------------------ spans, by hand


def test_docstring_example():
    a = align_spans([(0, 1), (1, 5), (5, 7)], [(0, 0), (0, 1), (1, 3), (3, 7)])
    assert groups(a) == [((0, 1), (1, 2), (0, 1)), ((1, 3), (2, 4), (1, 7))]
    assert a.student_target_to_teacher_position.tolist() == [-1, 1, -1]


def test_multibyte_characters_stay_whole():
    # "é漢": the student splits the bytes c3 | a9 e6 | bc a2 across both characters; a
    # token's span runs from the character of its first byte to that of its last
    a = align_spans([(0, 1), (0, 2), (1, 2)], [(0, 1), (1, 2)])
    assert groups(a) == [((0, 3), (0, 2), (0, 2))]
    # "😀a": two tokens of one emoji repeat its span and end together
    a = align_spans([(0, 1), (0, 1), (1, 2)], [(0, 1), (1, 2)])
    assert groups(a) == [((0, 2), (0, 1), (0, 1)), ((2, 3), (1, 2), (1, 2))]
    assert a.student_target_to_teacher_position.tolist() == [-1, -1, 0]


def test_digits_split_differently():
    # "x 12345": student x|Ġ1|2345, teacher x|Ġ123|45 -> only the number's end is common
    a = align_spans([(0, 1), (1, 3), (3, 7)], [(0, 1), (1, 5), (5, 7)])
    assert groups(a) == [((0, 1), (0, 1), (0, 1)), ((1, 3), (1, 3), (1, 7))]
    assert a.student_target_to_teacher_position.tolist() == [-1, 0, -1]


def test_leading_spaces_included_or_not():
    # "a b c": Ġ-style offsets include the space, trimmed ones do not; both end alike
    a = align_spans([(0, 1), (1, 3), (3, 5)], [(0, 1), (2, 3), (4, 5)])
    assert groups(a) == [((0, 1), (0, 1), (0, 1)), ((1, 2), (1, 2), (1, 3)), ((2, 3), (2, 3), (3, 5))]
    assert a.student_target_to_teacher_position.tolist() == [-1, 0, 1]
    # a space token of its own (▁ | b) merges with the other side's Ġb
    a = align_spans([(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)])
    assert groups(a) == [((0, 1), (0, 1), (0, 1)), ((1, 2), (1, 3), (1, 3))]
    # "a   b" with ByteLevel's trimmed offsets: whitespace tokens are empty but still cut
    trimmed = [(0, 1), (3, 3), (4, 4), (4, 5)]  # a ĠĠ Ġ b
    a = align_spans(trimmed, [(0, 1), (1, 3), (3, 4), (4, 5)])
    assert groups(a) == [((i, i + 1), (i, i + 1), c) for i, c in enumerate([(0, 1), (1, 3), (3, 4), (4, 5)])]
    # " x" trimmed: the leading Ġ reads (0, 0); the special mask keeps it as text
    a = align_spans([(0, 0), (0, 0), (1, 2)], [(0, 0), (0, 2)],
                    student_skip=[True, False, False], teacher_skip=[True, False])
    assert groups(a) == [((1, 3), (1, 2), (0, 2))]
    assert a.student_target_to_teacher_position.tolist() == [-1, 0, -1]


def test_newline():
    # "a\nb": a | Ċ | b against a\n | b
    a = align_spans([(0, 1), (1, 2), (2, 3)], [(0, 2), (2, 3)])
    assert groups(a) == [((0, 2), (0, 1), (0, 2)), ((2, 3), (1, 2), (2, 3))]
    assert a.student_target_to_teacher_position.tolist() == [-1, -1, 0]


def test_empty_text_and_specials():
    assert len(align_spans([], [])) == 0
    a = align_spans([(0, 0)], [])  # BOS alone
    assert len(a) == 0 and a.student_target_to_teacher_position.tolist() == [-1]
    # BOS on both, EOS on the student: specials are in no group and never targets
    a = align_spans([(0, 0), (0, 2), (2, 3), (0, 0)], [(0, 0), (0, 3)])
    assert groups(a) == [((1, 3), (1, 2), (0, 3))]
    assert a.student_target_to_teacher_position.tolist() == [-1, 0, -1, -1]


def test_truncated_side_leaves_the_rest_unaligned():
    a = align_spans([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2)])
    assert groups(a) == [((0, 1), (0, 1), (0, 1)), ((1, 2), (1, 2), (1, 2))]
    assert a.student_target_to_teacher_position.tolist() == [-1, 0, -1]


def test_offsets_out_of_order_are_refused():
    with pytest.raises(ValueError):
        align_spans([(0, 3), (1, 2)], [(0, 3)])


# ------------------------------------------------------------- spans, real tokenizers


def random_text(rng):
    chars = ALPHABET + "   \n"
    return "".join(rng.choice(chars) for _ in range(rng.randint(0, 40))).lstrip()


def test_same_tokenizer_is_the_identity(pair):
    student, _ = pair
    rng = random.Random(0)
    texts = ["the cat sat", "12345 + 678", "café 漢字\n😀 👍🏽", *(random_text(rng) for _ in range(50))]
    for text in texts:
        ids, off, special = encode(student, text)
        a = align_spans(off, off, student_skip=special, teacher_skip=special)
        assert np.array_equal(a.student_ranges, a.teacher_ranges)
        m = a.student_target_to_teacher_position
        starts = a.student_ranges[:, 0]
        assert np.array_equal(np.flatnonzero(m >= 0), starts[starts >= 1])
        assert np.all(m[m >= 0] == np.flatnonzero(m >= 0) - 1)
    ids, off, special = encode(student, "the cat 123")  # no split characters: one group a token
    a = align_spans(off, off)
    assert len(a) == len(ids) and a.student_target_to_teacher_position.tolist() == [-1, *range(len(ids) - 1)]


def test_aligned_pairs_cover_the_same_text(pair):
    """Each group ends at the same text on both sides, and each aligned target's two
    predicting positions have read exactly the same text."""
    student, teacher = pair
    dec = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    rng = random.Random(1)
    aligned = 0
    for _ in range(300):
        text = random_text(rng)
        s_ids, s_off, s_special = encode(student, text)
        t_ids, t_off, t_special = encode(teacher, text)
        a = align_spans(s_off, t_off, student_skip=s_special, teacher_skip=t_special)
        assert a.char_spans[-1, 1] == len(text) if text else len(a) == 0
        for (_, s_end), (_, t_end), (_, c_end) in zip(a.student_ranges, a.teacher_ranges, a.char_spans):
            assert student.decode(s_ids[:s_end], **dec) == text[:c_end]
            assert teacher.decode(t_ids[:t_end], **dec) == text[:c_end]
        for k, p in enumerate(a.student_target_to_teacher_position.tolist()):
            if p >= 0:
                aligned += 1
                assert student.decode(s_ids[:k], **dec) == teacher.decode(t_ids[:p + 1], **dec)
    assert aligned > 1000


def test_default_skip_matches_the_special_mask(pair):
    """transformers' offsets give added specials (0, 0): the default skips exactly those."""
    student, teacher = pair
    text = "x = 12345 漢字 😀"
    _, s_off, s_special = encode(student, text)
    _, t_off, t_special = encode(teacher, text)
    assert t_special[0]  # the teacher's BOS
    masked = align_spans(s_off, t_off, student_skip=s_special, teacher_skip=t_special)
    default = align_spans(s_off, t_off)
    assert groups(masked) == groups(default)
    np.testing.assert_array_equal(masked.student_target_to_teacher_position,
                                  default.student_target_to_teacher_position)


# ----------------------------------------------------------------- shared vocabulary


def test_byte_to_unicode_is_gpt2s():
    table = byte_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert token_bytes("Ã©", "byte_level") == "é".encode()


STUDENT = {"<s>": 0, "</s>": 1, "Ġthe": 2, "the": 3, "Ċ": 4, "Ã©": 5, "Ã": 6, "ab": 7, "Ġ": 8, "A": 9}
TEACHER = {"<unk>": 0, "<|end|>": 1, "▁the": 2, "the": 3, "<0x0A>": 4, "é": 5, "<0xC3>": 6, "▁": 7,
           "xy": 8, "<0x41>": 9, "A": 10, "</s>": 11}


def test_shared_vocab_pairs_markers_and_excludes_specials():
    sv = shared_vocab(STUDENT, TEACHER, student_special_ids=[0, 1], teacher_special_ids=[0, 1, 11],
                      student_eos_id=1, teacher_eos_id=1)
    pairs = list(zip(sv.student_ids.tolist(), sv.teacher_ids.tolist()))
    assert pairs == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (8, 7), (9, 10)]
    assert detect_convention(vocab=STUDENT) == "byte_level"
    assert detect_convention(vocab=TEACHER) == "sentencepiece"
    no_eos = shared_vocab(STUDENT, TEACHER, student_special_ids=[0, 1], teacher_special_ids=[0, 1, 11])
    assert 1 not in no_eos.student_ids.tolist() and 11 not in no_eos.teacher_ids.tolist()


def test_detect_convention_from_tokenizer_json():
    llama2 = {"normalizer": {"type": "Sequence", "normalizers": [
                  {"type": "Prepend", "prepend": "▁"},
                  {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
              "pre_tokenizer": None,
              "decoder": {"type": "Sequence", "decoders": [
                  {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                  {"type": "ByteFallback"}, {"type": "Fuse"}]},
              "model": {"type": "BPE", "vocab": {"a": 0}}}
    qwen = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split"}, {"type": "ByteLevel", "add_prefix_space": False}]},
            "decoder": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {"a": 0}}}
    wordlevel = {"pre_tokenizer": {"type": "Whitespace"}, "model": {"type": "WordLevel", "vocab": {"a": 0}}}
    assert detect_convention(llama2) == "sentencepiece"
    assert detect_convention(qwen) == "byte_level"
    assert detect_convention(wordlevel) == "plain"


def test_shared_vocab_of_the_pair(pair):
    student, teacher = pair
    assert detect_convention(student) == "byte_level" and detect_convention(teacher) == "sentencepiece"
    sv = shared_vocab_from_tokenizers(student, teacher)
    s_inv = {i: t for t, i in student.get_vocab().items()}
    t_inv = {i: t for t, i in teacher.get_vocab().items()}
    pairs = dict(zip(sv.student_ids.tolist(), sv.teacher_ids.tolist()))
    assert pairs[student.eos_token_id] == teacher.eos_token_id
    assert pairs[student.convert_tokens_to_ids("Ġ")] == teacher.convert_tokens_to_ids("▁")
    assert pairs[student.convert_tokens_to_ids("1")] == teacher.convert_tokens_to_ids("1")
    assert pairs[student.convert_tokens_to_ids("Ċ")] == teacher.convert_tokens_to_ids("\n")  # not <0x0A>
    assert pairs[student.convert_tokens_to_ids("ð")] == teacher.convert_tokens_to_ids("<0xF0>")
    for s, t in pairs.items():
        if s == student.eos_token_id:
            continue
        assert s not in student.all_special_ids and t not in teacher.all_special_ids
        assert token_bytes(s_inv[s], "byte_level") == token_bytes(t_inv[t], "sentencepiece")
    assert len(set(pairs.values())) == len(pairs) > 100
