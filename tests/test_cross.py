"""Cross-tokenizer distillation: a teacher whose tokenizer is not the student's.

Tiny models over the two tokenizers of tests/tokenizer_pair.py (byte-level student,
SentencePiece-style teacher), built here offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpd.cli.main import cli
from tokenizer_pair import make_pair


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Tokenizers, random tiny models over each (and a teacher over the student's), a data file."""
    from conftest import build_model

    root = tmp_path_factory.mktemp("cross")
    student_tok, teacher_tok = make_pair(root / "tok")
    out = {"root": root, "student_tok": student_tok, "teacher_tok": teacher_tok}
    out["student"] = build_model(root / "student", root / "tok" / "student", hidden=32, layers=1, seed=2)
    out["teacher"] = build_model(root / "teacher", root / "tok" / "teacher", hidden=48, layers=2, seed=1)
    out["same_teacher"] = build_model(root / "same_teacher", root / "tok" / "student", hidden=48, layers=2, seed=1)
    rows = []
    for i in range(12):
        a, b = i % 7, (3 * i) % 5
        rows.append({"prompt": f"what is {a} plus {b}?", "completion": f" the answer is {a + b}"})
        rows.append({"messages": [{"role": "user", "content": f"how many cats sat on {a} mats"},
                                  {"role": "assistant", "content": f"the cat sat on {b} mats, café 😀"}]})
        rows.append({"text": f"x = {a}{b}12 漢字 and the dog ran to it"})
    out["data"] = write_jsonl(root / "train.jsonl", rows)
    return out


def one_line_error(result, *needles):
    out = result.output
    assert "Traceback" not in out, out
    assert result.exit_code != 0, out
    errors = [ln for ln in out.splitlines() if ln.lower().startswith(("error", "usage error"))]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


# ------------------------------------------------------------------ before: a silent path


def test_eval_refuses_a_teacher_of_another_tokenizer(pair):
    """`hpd eval --teacher` fed the model's token ids to a teacher that reads other ids and
    printed a KL as if it meant something; it must refuse."""
    result = CliRunner().invoke(cli, ["eval", "--model", str(pair["student"]), "--teacher", str(pair["teacher"]),
                                      "--data", str(pair["data"]), "--limit", "2", "--max-new-tokens", "2",
                                      "--no-progress", "--json"])
    assert '"kl_to_teacher":' not in result.output
    one_line_error(result, "--teacher", "tokenizer")
