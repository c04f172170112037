"""The paper's metrics in `hpd eval`, and each paper recipe run end to end on tiny stand-ins.

The scoring functions themselves are held to hand-made answers in test_scoring.py. Here a
backend whose generations are fixed texts checks that `hpd eval`'s scoring feeds them the
right references (known scores); then each `recipes/paper-*.yaml` trains a tiny stand-in
for two steps and is scored by `hpd eval --recipe`, which cannot download the real models
or data here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hpd.cli.main import cli

from hpd.report.evaluate import accuracy

MATH = [
    {"prompt": "What is 1/2 of 1?\n", "completion": "Half of one. \\boxed{\\frac{1}{2}}"},
    {"prompt": "What is 6 x 7?\n", "completion": "6 x 7 = 42\n#### 42"},
    {"prompt": "What is 2 + 2?\n", "completion": "\\boxed{4}"},
]
DIALOGUE = [
    {"messages": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "the sky is blue"}]},
    {"messages": [{"role": "user", "content": "Say hello."},
                  {"role": "assistant", "content": "hello there friend"}]},
]
CODE = [
    {"prompt": "Write add(a, b).\n", "completion": "def add(a, b):\n    return a + b",
     "test": "assert add(2, 3) == 5"},
    {"prompt": "Write neg(x).\n", "completion": "def neg(x):\n    return -x", "test": "assert neg(4) == -4"},
]


class Scripted:
    """A backend whose model answers each prompt with a fixed text (token ids of the tokenizer)."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, model, tokenizer, prompts, **kw):
        out = []
        for ids in prompts:
            prompt = tokenizer.decode(ids, skip_special_tokens=True)
            text = next(a for q, a in self.answers.items() if q in prompt)
            out.append(tokenizer.encode(text, add_special_tokens=False))
        return out


class CharTokenizer:
    """Enough of a tokenizer for prompt_ids and decoding: one id per character."""

    bos_token_id = None
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")
        return self.encode(text) if tokenize else text


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_math_exact_match_and_sampled_pass_at_1(tmp_path):
    tok = CharTokenizer()
    data = write(tmp_path / "math.jsonl", MATH)
    answers = {"1/2 of 1": "It is 0.5", "6 x 7": "so the answer is \\boxed{42}.", "2 + 2": "maybe 5"}
    got = accuracy(Scripted(tok, answers), None, tok, data, extractor="math", progress=False)
    assert got["accuracy"] == pytest.approx(2 / 3)  # 0.5 = 1/2, boxed 42 = #### 42, 5 != 4
    sampled = accuracy(Scripted(tok, answers), None, tok, data, extractor="math", samples=3, progress=False)
    assert sampled["pass@1"] == pytest.approx(2 / 3) and sampled["samples"] == 3
    # the old extractors are unchanged: "answer" finds no 'Answer:' line in any of these
    assert accuracy(Scripted(tok, answers), None, tok, data, progress=False)["accuracy"] == 0.0


def test_rouge_l_of_generations_against_the_reference(tmp_path):
    pytest.importorskip("rouge_score")
    tok = CharTokenizer()
    data = write(tmp_path / "dialogue.jsonl", DIALOGUE)
    # identical: F = 1; "hello friend" vs "hello there friend": LCS 2, P = 1, R = 2/3, F = 0.8
    answers = {"Name a colour": "the sky is blue", "Say hello": "hello friend"}
    got = accuracy(Scripted(tok, answers), None, tok, data, metric="rouge-l", progress=False)
    assert got["rouge_l"] == pytest.approx(100 * (1.0 + 0.8) / 2)


def test_code_pass_at_1_runs_the_rows_tests(tmp_path):
    tok = CharTokenizer()
    data = write(tmp_path / "code.jsonl", CODE)
    answers = {"add(a, b)": "```python\ndef add(a, b):\n    return a + b\n```", "neg(x)": "def neg(x):\n    return x"}
    got = accuracy(Scripted(tok, answers), None, tok, data, metric="code", progress=False)
    assert got["pass@1"] == 0.5  # add passes its assert, neg fails its own
    with pytest.raises(ValueError, match='needs a "test" field'):
        accuracy(Scripted(tok, answers), None, tok, write(tmp_path / "no_test.jsonl", MATH[:1]), metric="code",
                 progress=False)


STANDINS = {"paper-math": (MATH, "accuracy"), "paper-dialogue": (DIALOGUE, "rouge_l"), "paper-code": (CODE, "pass@1")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(STANDINS))
def test_paper_recipe_end_to_end_on_tiny_standins(tmp_path, recipe):
    """Each paper recipe, its models and data swapped for the shipped tiny ones and stand-in
    rows of its kind: two training steps, then `hpd eval --recipe` scores the student with the
    recipe's own metric."""
    if recipe == "paper-dialogue":
        pytest.importorskip("rouge_score")
    rows, key = STANDINS[recipe]
    data = write(tmp_path / "data.jsonl", rows * 4)
    held = write(tmp_path / "held.jsonl", rows)
    out = tmp_path / "student"
    args = ["distill", "--recipe", recipe, "--teacher", "hpd:tiny/teacher", "--student", "hpd:tiny/student",
            "--data", data, "--eval-data", held, "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--max-length", "96", "--dtype", "float32", "--no-progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()
    score = CliRunner().invoke(cli, ["eval", "--recipe", recipe, "--model", str(out), "--data", held,
                                     "--max-new-tokens", "8", "--json", "--no-progress"], catch_exceptions=False)
    assert score.exit_code == 0, score.output
    # a code metric first says which sandbox layers hold here (on stderr, so --json stays one line)
    assert ("code sandbox: " in score.stderr) == (recipe == "paper-code")
    assert "code sandbox" not in score.stdout
    report = json.loads(score.output.strip().splitlines()[-1])
    assert report["rows"] == len(rows) and key in report
    assert 0.0 <= report[key] <= (100.0 if key == "rouge_l" else 1.0)
    assert report["perplexity"] > 1.0
