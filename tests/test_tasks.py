"""The arithmetic task generator and the embedded tiny teacher / student assets."""

import json
import re

import pytest

from hpd.tasks import arith, tiny

PROMPT_RE = re.compile(r"^\w+ has (\d+) \w+\.((?: \w+ [a-z ]+ \d+(?: more)?\.)+) How many \w+ now\?\n$")
STEP_RE = re.compile(r" \w+ ([a-z ]+?) (\d+)( more)?\.")


def recompute(prompt: str) -> tuple:
    """(start, [(sign, n), ...], answer) read back from the prompt's words alone."""
    m = PROMPT_RE.match(prompt)
    assert m, prompt
    start = int(m.group(1))
    ops = []
    for verb, n, more in STEP_RE.findall(m.group(2)):
        gain = f"{verb} {{n}} more" in arith.GAIN_VERBS
        loss = f"{verb} {{n}}" in arith.LOSS_VERBS
        assert gain != loss and bool(more) == gain, (verb, prompt)
        ops.append(("+" if gain else "-", int(n)))
    value = start
    for sign, n in ops:
        value = value + n if sign == "+" else value - n
    return start, ops, value


# ---------------------------------------------------------------- generator


def test_generate_is_deterministic():
    assert arith.generate(3, 50) == arith.generate(3, 50)
    assert arith.generate(3, 50) != arith.generate(4, 50)
    assert arith.make_split(7, 100, 20) == arith.make_split(7, 100, 20)


def test_rows_have_correct_worked_answers():
    rows = arith.generate(0, 500)
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        start, ops, answer = recompute(row["prompt"])
        lines = row["completion"].split("\n")
        assert lines[-1] == f"Answer: {answer}"
        assert arith.extract_answer(row["completion"]) == str(answer)
        value = start
        for line, (sign, n) in zip(lines[:-1], ops):
            new = value + n if sign == "+" else value - n
            assert line == f"{value}{sign}{n}={new}"
            value = new
        assert len(lines) == len(ops) + 1


def test_difficulty_knobs():
    easy = arith.generate(1, 300, min_steps=1, max_steps=1, start_range=(0, 5), operand_range=(1, 3), max_value=10)
    hard = arith.generate(1, 300, min_steps=4, max_steps=5, start_range=(10, 50), operand_range=(10, 30), max_value=99)
    for row in easy:
        start, ops, answer = recompute(row["prompt"])
        assert len(ops) == 1 and 1 <= ops[0][1] <= 3 and 0 <= answer <= 10
    for row in hard:
        start, ops, answer = recompute(row["prompt"])
        assert 4 <= len(ops) <= 5 and 10 <= start <= 50 and 0 <= answer <= 99
    # defaults: 2-3 steps, all running totals in [0, 40]
    for row in arith.generate(2, 300):
        start, ops, _ = recompute(row["prompt"])
        assert 2 <= len(ops) <= 3
        value = start
        for sign, n in ops:
            value = value + n if sign == "+" else value - n
            assert 0 <= value <= 40
    with pytest.raises(TypeError):
        arith.generate(0, 1, steps=3)


def test_split_does_not_overlap():
    train, held = arith.make_split(0, 3000, 150)
    assert len(train) == 3000 and len(held) == 150
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train)
    assert not train_prompts & {r["prompt"] for r in held}
    # stronger: no held-out problem shares its arithmetic with a training problem
    def sig(row):
        start, ops, _ = recompute(row["prompt"])
        return (start, tuple(ops))

    held_sigs = {sig(r) for r in held}
    assert len(held_sigs) == len(held)
    assert not held_sigs & {sig(r) for r in train}
    # the split does not depend on how many rows are asked for
    train2, held2 = arith.make_split(0, 500, 40)
    assert not {sig(r) for r in held2} & {sig(r) for r in train}
    assert not {sig(r) for r in held} & {sig(r) for r in train2}


def test_split_too_small_raises():
    with pytest.raises(ValueError):
        arith.make_split(0, 1000, 10, min_steps=1, max_steps=1, start_range=(1, 2), operand_range=(1, 1))


def test_extract_answer():
    assert arith.extract_answer("3+4=7\nAnswer: 7") == "7"
    assert arith.extract_answer("Answer:12") == "12"
    assert arith.extract_answer("Answer: -3") == "-3"
    assert arith.extract_answer("Answer: 007 apples") == "7"
    assert arith.extract_answer("Answer: 5\nAnswer: 9") == "9"  # the last one counts
    assert arith.extract_answer("Answer: 5\nAnswer: none") is None
    assert arith.extract_answer("3+4=7") is None
    assert arith.extract_answer("") is None
    assert arith.extract_answer(None) is None
    assert arith.is_correct("1+1=2\nAnswer: 2", "x\nAnswer: 2")
    assert not arith.is_correct("1+1=3\nAnswer: 3", "x\nAnswer: 2")
    assert not arith.is_correct("1+1=2", "x\nAnswer: 2")
    assert not arith.is_correct("Answer: 2", "no answer here")


def test_write_jsonl_roundtrip(tmp_path):
    rows = arith.generate(0, 5)
    path = tmp_path / "sub" / "rows.jsonl"
    arith.write_jsonl(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert arith.read_jsonl(path) == rows


# ---------------------------------------------------------------- shipped assets


def test_assets_exist_and_are_small():
    for d in (tiny.TEACHER_DIR, tiny.STUDENT_DIR):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "README.md"):
            assert (d / f).is_file(), d / f
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["vocab_size"] <= 512
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    total = sum(p.stat().st_size for p in tiny.TINY_DIR.rglob("*") if p.is_file())
    assert total < 8e6, total
    train, held = tiny.load_rows("train"), tiny.load_rows("held")
    manifest = tiny.load_manifest()
    assert len(train) == manifest["n_train_shipped"] and len(held) == manifest["n_held"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for row in train[:200] + held:
        assert recompute(row["prompt"])[2] == int(arith.extract_answer(row["completion"]))
    # the shipped data is what the generator makes
    regen_train, regen_held = arith.make_split(manifest["seed"], manifest["n_train_pool"], manifest["n_held"],
                                               **manifest["difficulty"])
    assert regen_held == held and regen_train[: len(train)] == train
    # the teacher is clearly better than the student, and the cards say so
    t, s = manifest["models"]["teacher"], manifest["models"]["student"]
    assert t["held_accuracy"] >= 0.8 and s["held_accuracy"] <= 0.5
    assert t["held_accuracy"] - s["held_accuracy"] >= 0.3
    for name in ("teacher", "student"):
        card = (tiny.TINY_DIR / name / "README.md").read_text()
        assert f"**{manifest['models'][name]['held_accuracy']:.3f}**" in card


def test_tokenizer_loads_identically():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny.TEACHER_DIR)
    student_tok = transformers.AutoTokenizer.from_pretrained(tiny.STUDENT_DIR)
    assert len(tok) <= 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    rows = tiny.load_rows("held")[:50]
    texts = [r["prompt"] for r in rows] + [r["completion"] for r in rows] + ["Hello, world! 1234 ünïcødé"]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert ids == [student_tok.encode(t, add_special_tokens=False) for t in texts]
    for t, i in zip(texts, ids):
        assert tok.decode(i) == t
    # chat template: [bos] + prompt for a user turn with a generation prompt
    chat = tok.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    assert chat == tiny.prompt_ids(tok, rows[0]["prompt"])

    try:
        import mlx_lm  # noqa: F401
        from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    except ImportError as e:
        pytest.skip(f"mlx-lm not installed ({e}): transformers half checked only")
    mlx_tok = load_mlx_tokenizer(tiny.TEACHER_DIR)
    assert [mlx_tok.encode(t, add_special_tokens=False) for t in texts] == ids
    assert (mlx_tok.bos_token_id, mlx_tok.eos_token_id, mlx_tok.pad_token_id) == (1, 2, 0)
    assert set(mlx_tok.eos_token_ids) == {2}
    detok = mlx_tok.detokenizer
    detok.reset()
    for i in ids[len(rows)]:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == texts[len(rows)]


@pytest.mark.slow
def test_teacher_accuracy_matches_card():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    manifest = tiny.load_manifest()
    n = manifest["eval_first"]
    card_acc = manifest["models"]["teacher"][f"held_accuracy_first{n}"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny.TEACHER_DIR, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tiny.TEACHER_DIR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to a busy machine
    try:
        acc = tiny.greedy_accuracy(model, tok, tiny.load_rows("held")[:n])
    finally:
        torch.set_num_threads(threads)
    assert abs(acc - card_acc) <= 2 / n + 1e-9, (acc, card_acc)
    assert acc >= 0.75
