"""Rows rendered by two tokenizers and their targets paired (hpd.teachers.pairing), over the
tokenizers and templates of tests/tokenizer_zoo.py."""

from __future__ import annotations

import numpy as np
import pytest

from hpd.data.examples import encode_row
from hpd.teachers.cross import teacher_ids_of
from hpd.teachers.pairing import Speller, pair_row
from tokenizer_zoo import make_tokenizer


def pair(row, student, teacher, max_length: int = 4096):
    return pair_row(row, student, teacher, (Speller(student), Speller(teacher)), teacher_ids_of(student, teacher),
                    max_length)


@pytest.mark.parametrize("kinds", [("bpe-320", "bpe-520"), ("bpe-520", "sp-bpe")])
def test_a_shared_template_with_text_after_the_end_token(kinds):
    """ChatML's `<|im_end|>\\n` on both sides (Qwen and SmolLM2 render turns so): the row
    pairs, and so do the end token and the newline after it, both targets."""
    student, teacher = (make_tokenizer(k, "chatml") for k in kinds)
    row = {"messages": [{"role": "user", "content": "what is 217 plus 892?"},
                        {"role": "assistant", "content": "7+2=9, write 9 carry 0; 2+8+0=10. Answer 1109"}]}
    p = pair(row, student, teacher)
    ids, t_ids = encode_row(row, student).input_ids, encode_row(row, teacher).input_ids
    end = len(ids) - 2  # ... <|im_end|> \n
    assert ids[end] == student.eos_token_id and student.decode(ids[end + 1:]) == "\n"
    taught = dict(zip(p.student_pos.tolist(), p.teacher_pos.tolist()))
    assert t_ids[taught[end] + 1] == teacher.eos_token_id
    assert teacher.decode(t_ids[taught[end + 1] + 1:]) == "\n"
    assert teacher.decode(t_ids[:taught[end + 1] + 1]).endswith("1109<|im_end|>")
