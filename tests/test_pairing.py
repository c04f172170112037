"""Rows rendered by two tokenizers and their targets paired (hpd.teachers.pairing), over the
tokenizers and templates of tests/tokenizer_zoo.py."""

from __future__ import annotations

import json

import pytest

from hpd.data.examples import encode_row
from hpd.teachers.align import detect_convention, token_bytes
from hpd.teachers.cross import example_key, prepare, teacher_ids_of
from hpd.teachers.pairing import Speller, pair_row, segments
from tokenizer_zoo import KINDS, make_tokenizer, random_rows


def pair(row, student, teacher, max_length: int = 4096):
    return pair_row(row, student, teacher, (Speller(student), Speller(teacher)), teacher_ids_of(student, teacher),
                    max_length)


@pytest.mark.parametrize("kinds", [("bpe-400", "bpe-800"), ("bpe-800", "sp-bpe")])
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



@pytest.mark.slow
def test_distill_across_byte_level_tokenizers_sharing_chatml(tmp_path):
    """`hpd distill` with two byte-level BPEs that share ChatML trains on every row."""
    from click.testing import CliRunner
    from conftest import build_model

    from hpd.cli.main import cli

    folders = {}
    for who, kind in (("student", "bpe-400"), ("teacher", "bpe-800")):
        make_tokenizer(kind, "chatml").save_pretrained(tmp_path / f"{who}_tok")
        folders[who] = build_model(tmp_path / who, tmp_path / f"{who}_tok", hidden=16, layers=1)
    rows = [r for r in random_rows(24, 5) if "messages" in r]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["distill", "--no-progress", "--teacher", str(folders["teacher"]), "--student",
                                      str(folders["student"]), "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "teacher tokenizer: cross" in result.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    aligned = [m["cross/aligned"] for m in metrics if "cross/aligned" in m]
    assert len(aligned) == 2 and all(0.3 < a < 1.0 for a in aligned), aligned


# ------------------------------------------------------------------ properties over random rows

SHARED = [("chatml", "chatml"), ("tagged", "tagged"), ("plain", "plain")]
DIFFERENT = [("tagged", "chatml"), ("chatml", "plain"), ("plain", "tagged")]  # (student's, teacher's)
PAIRS = [(s, t) for s in KINDS for t in KINDS if s != t]


def spelling(tok) -> list[bytes]:
    """Each id's bytes under the tokenizer's convention; a special spells its name in angle
    brackets, so it only matches the same special (EOS matches EOS by role)."""
    convention = detect_convention(tok)
    names = tok.convert_ids_to_tokens(list(range(len(tok))))
    specials = set(tok.all_special_ids)
    return [b"<EOS>" if i == tok.eos_token_id else f"<{n}>".encode() if i in specials else token_bytes(n, convention)
            for i, n in enumerate(names)]


def check_row(row, tokenizers, spellings, templates, p) -> None:
    """One row's pairs `p`: each paired target's teacher token spells the student's, after
    the same response text; the end token and (with ChatML on both sides) the newline
    after it are paired where both sides end the response with their end token."""
    (student, teacher), (spell_s, spell_t) = tokenizers, spellings
    s_ex, t_ex = encode_row(row, student), encode_row(row, teacher)
    ids, t_ids = s_ex.input_ids, t_ex.input_ids
    starts = [(a, c) for (a, _), (c, _) in zip(segments(s_ex.loss_mask), segments(t_ex.loss_mask))]
    taught = dict(zip(p.student_pos.tolist(), p.teacher_pos.tolist()))
    for i, q in taught.items():
        assert s_ex.loss_mask[i] and t_ex.loss_mask[q + 1], (row, i, q)
        assert spell_s[ids[i]] == spell_t[t_ids[q + 1]], (row, i, q)
        a, c = max(x for x in starts if x[0] <= i)
        read_s = b"".join(spell_s[x] for x in ids[a:i] if x not in student.all_special_ids)
        read_t = b"".join(spell_t[x] for x in t_ids[c:q + 1] if x not in teacher.all_special_ids)
        assert read_s.lstrip() == read_t.lstrip(), (row, i, q, read_s, read_t)
    ends = [i for i, x in enumerate(ids) if x == student.eos_token_id and s_ex.loss_mask[i]]
    if "messages" not in row or "plain" not in templates:
        assert all(i in taught for i in ends), (row, ends, taught)
    if "messages" in row and templates == ("chatml", "chatml"):
        assert all(i + 1 in taught for i in ends), (row, ends, taught)


@pytest.mark.parametrize("kinds", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_random_rows_pair_soundly(kinds, tmp_path):
    """Over random chat and prompt/completion rows, with a template shared by both sides
    (with text after the end token and without) or one of each: `prepare` refuses no row
    (both sides render the same response text), every pair holds (`check_row`), and the
    share it reports is the pairs' count over the targets'."""
    seed = PAIRS.index(kinds)
    for n, templates in enumerate(SHARED + DIFFERENT):
        tokenizers = make_tokenizer(kinds[0], templates[0]), make_tokenizer(kinds[1], templates[1])
        rows = random_rows(12, 100 * seed + n)
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = prepare([(path, {})], *tokenizers, 4096)
        spellings = spelling(tokenizers[0]), spelling(tokenizers[1])
        targets = paired = 0
        for row in rows:
            ex = encode_row(row, tokenizers[0])
            p = data.examples[example_key(ex.input_ids, ex.loss_mask[1:])]
            check_row(row, tokenizers, spellings, templates, p)
            targets, paired = targets + p.targets, paired + len(p.student_pos)
        assert (data.targets, data.paired) == (targets, paired)
        assert f"{100 * paired / targets:.1f}% of {targets} student target positions paired" in data.describe()
        assert paired > 0.3 * targets, (templates, paired, targets)
