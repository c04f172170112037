"""The sums task generator and its shipped teacher / student (hpd/assets/sums)."""

import json
import math
import random
import re

import pytest

from hpd.tasks import sums, sums_models

RUNNING = re.compile(r"^([a-j]): (\d+)\+(\d)=(\d+)$")
PAIR = re.compile(r"^([a-j])\+([a-j]) = (\d)\+(\d) = (\d+)$")
FOLD = re.compile(r"^(\d+)\+(\d+) = (\d+)$")


def check_working(prompt: str, completion: str) -> str:
    """Re-derive an answer line by line from the prompt alone; returns its style."""
    values = {l: int(v) for l, v in re.findall(r"([a-j])=(\d)", prompt)}
    letters = "".join(values)
    lines = completion.split("\n")
    assert lines[-1] == f"Answer: {sum(values.values())}"
    body = lines[:-1]
    if PAIR.match(body[0]):  # pairs: adjacent letters, then fold the partial sums left to right
        partial = []
        for i, line in enumerate(body[: len(letters) // 2]):
            a, b, va, vb, s = PAIR.match(line).groups()
            assert a + b == letters[2 * i: 2 * i + 2] and (int(va), int(vb)) == (values[a], values[b])
            assert int(s) == values[a] + values[b]
            partial.append(int(s))
        if len(letters) % 2:  # the last number stands alone
            assert body[len(partial)] == f"{letters[-1]} = {values[letters[-1]]}"
            partial.append(values[letters[-1]])
        total = partial[0]
        for line, p in zip(body[len(partial):], partial[1:]):
            x, y, s = map(int, FOLD.match(line).groups())
            assert (x, y, s) == (total, p, total + p)
            total = s
        assert len(body) == 2 * len(partial) - 1
        return "pairs"
    first, v = body[0].split(": ")
    assert int(v) == values[first]
    order, total = [first], int(v)
    for line in body[1:]:
        l, prev, add, new = RUNNING.match(line).groups()
        assert (int(prev), int(add), int(new)) == (total, values[l], total + values[l])
        order.append(l)
        total = int(new)
    assert "".join(order) in (letters, letters[::-1])
    return "forward" if "".join(order) == letters else "backward"


# ---------------------------------------------------------------- generator


def test_generate_is_deterministic():
    assert sums.generate(3, 50) == sums.generate(3, 50)
    assert sums.generate(3, 50) != sums.generate(4, 50)
    mix = {"forward": 1, "backward": 1, "pairs": 1}
    assert sums.generate(3, 50, mix) == sums.generate(3, 50, mix)
    assert sums.make_split(7, 100, 20) == sums.make_split(7, 100, 20)


def test_every_style_is_correct_working():
    rng = random.Random(0)
    for count in (2, 3, 5, 6, 7, 10):
        for _ in range(100):
            p = sums.sample_problem(rng, count=count)
            assert sums.parse_prompt(p.prompt()) == p
            for style, completion in p.completions().items():
                got = check_working(p.prompt(), completion)
                # a palindromic list makes backward read like forward
                assert got == style or (style == "backward" and p.values == p.values[::-1])
                assert sums.extract_answer(completion) == str(sum(p.values))
                assert sums.style_of(p.prompt(), completion) in (style, "forward")


def test_styles_are_long_and_differ():
    p = sums.Problem((7, 7, 1, 5, 9, 8))
    c = p.completions()
    assert c["forward"].startswith("a: 7\nb: 7+7=14\n") and c["forward"].endswith("f: 29+8=37\nAnswer: 37")
    assert c["backward"].startswith("f: 8\ne: 8+9=17\n")
    assert c["pairs"] == "a+b = 7+7 = 14\nc+d = 1+5 = 6\ne+f = 9+8 = 17\n14+6 = 20\n20+17 = 37\nAnswer: 37"
    assert len(set(c.values())) == 3
    # an odd count leaves the last number alone in the pairs style
    assert sums.Problem((1, 2, 3)).completion("pairs") == "a+b = 1+2 = 3\nc = 3\n3+3 = 6\nAnswer: 6"


def test_style_mix_is_respected():
    rows = sums.generate(0, 3000, {"forward": 0.45, "backward": 0.45, "pairs": 0.1})
    share = {s: sum(r["style"] == s for r in rows) / len(rows) for s in sums.STYLES}
    assert abs(share["forward"] - 0.45) < 0.04 and abs(share["pairs"] - 0.1) < 0.03
    assert all(r["style"] == "pairs" for r in sums.generate(0, 20))
    with pytest.raises(ValueError):
        sums.generate(0, 1, {"sideways": 1.0})


def test_style_of_rejects_wrong_working():
    p = sums.Problem((1, 2, 3, 4))
    assert sums.style_of(p.prompt(), p.completion("backward") + "\n") == "backward"
    wrong = p.completion("forward").replace("b: 1+2=3", "b: 1+2=4")
    assert sums.style_of(p.prompt(), wrong) is None
    assert sums.style_of(p.prompt(), "Answer: 10") is None
    with pytest.raises(ValueError):
        sums.parse_prompt("Sum b=1 a=2\n")
    # an answer that opens forward and goes on in pairs: no style, forward opening
    mixed = "a: 1\nc+d = 3+4 = 7\nAnswer: 10"
    assert sums.style_of(p.prompt(), mixed) is None and sums.opening_of(p.prompt(), mixed) == "forward"
    assert sums.opening_of(p.prompt(), p.completion("pairs")) == "pairs"
    assert sums.opening_of(p.prompt(), "d: 4\n") == "backward" and sums.opening_of(p.prompt(), "b: 2") is None
    assert sums.opening_of(p.prompt(), "a+b = 1+3 = 5\n") == "pairs"  # wrong numbers, pairs all the same
    r = sums_models.score([p.prompt()] * 2, [p.completion("pairs")] * 2, [mixed, p.completion("backward")])
    assert r["accuracy"] == 1.0 and r["styles"]["backward"] == 0.5 and r["styles"]["other"] == 0.5
    assert r["openings"] == {"forward": 0.5, "backward": 0.5, "pairs": 0.0, "other": 0.0}


def test_split_does_not_overlap_and_knobs_are_checked():
    train, held = sums.make_split(0, 3000, 150)
    assert len(train) == 3000 and len(held) == 150
    train_sigs = {p.signature for p in train}
    assert len(train_sigs) == 3000 and len({p.signature for p in held}) == 150
    assert not train_sigs & {p.signature for p in held}
    _, held2 = sums.make_split(0, 500, 40)
    assert not {p.signature for p in held2} & train_sigs  # the split does not depend on the sizes
    with pytest.raises(ValueError):
        sums.make_split(0, 100, 10, count=2, value_range=(1, 3))
    with pytest.raises(TypeError):
        sums.generate(0, 1, steps=3)
    with pytest.raises(ValueError):
        sums.generate(0, 1, count=11)


# ---------------------------------------------------------------- shipped assets


def test_assets_match_the_generator_and_are_small():
    manifest = sums_models.load_manifest()
    total = sum(p.stat().st_size for p in sums_models.SUMS_DIR.rglob("*") if p.is_file())
    assert total < 6e6, total
    train, held = sums_models.load_rows("train"), sums_models.load_rows("held")
    pool, held_problems = sums.make_split(manifest["seed"], manifest["n_teacher_pool"] + manifest["n_student_pool"],
                                          manifest["n_held"], **manifest["difficulty"])
    assert train == [p.row("pairs") for p in pool[: manifest["n_train_shipped"]]]
    assert held == [p.row("pairs") for p in held_problems]
    for row in held + train[:300]:
        assert check_working(row["prompt"], row["completion"]) == "pairs"
    teacher_rows = sums_models.load_rows("held_teacher")
    assert [r["prompt"] for r in teacher_rows] == [r["prompt"] for r in held]
    assert min(manifest["min_working_tokens"].values()) >= 40
    t, s = manifest["models"]["teacher"], manifest["models"]["student"]
    assert s["params"] * 4 <= t["params"] <= 1_000_000
    for name in ("teacher", "student"):
        card = (sums_models.SUMS_DIR / name / "README.md").read_text()
        m = manifest["models"][name]
        assert f"**{m['greedy_accuracy']:.3f}**" in card and f"**{m['sampled_accuracy']:.3f}**" in card
        cfg = json.loads((sums_models.SUMS_DIR / name / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["vocab_size"] <= 512


def _load(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def test_teacher_puts_real_mass_on_two_answers():
    """For each prompt, the teacher's probabilities of the full forward and backward answers."""
    model, tok = _load(sums_models.TEACHER_DIR)
    held = [sums.parse_prompt(r["prompt"]) for r in sums_models.load_rows("held")[:12]]
    both = 0
    for p in held:
        fwd, bwd, pairs = (math.exp(v) for v in sums_models.completion_logprobs(
            model, tok, p.prompt(), [p.completion(s) for s in sums.STYLES]))
        assert fwd + bwd + pairs <= 1.0 + 1e-4
        both += fwd >= 0.1 and bwd >= 0.1
    assert both >= 9, both  # two distinct answers with at least 10% each, on most prompts


@pytest.mark.slow
def test_teacher_accuracy_matches_card():
    torch = pytest.importorskip("torch")
    manifest = sums_models.load_manifest()
    n = manifest["eval_first"]
    card = manifest["models"]["teacher"][f"greedy_accuracy_first{n}"]
    model, tok = _load(sums_models.TEACHER_DIR)
    rows = sums_models.load_rows("held")[:n]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to a busy machine
    try:
        texts = sums_models.generate_texts(model, tok, [r["prompt"] for r in rows],
                                           max_new_tokens=manifest["max_new_tokens"])
    finally:
        torch.set_num_threads(threads)
    got = sums_models.score([r["prompt"] for r in rows], [r["completion"] for r in rows], texts)["accuracy"]
    assert abs(got - card) <= 1 / n + 1e-9, (got, card)
    assert got >= manifest["models"]["student"]["greedy_accuracy"] + 0.3


def test_sums_recipe_points_at_the_shipped_assets():
    from hpd.train.config import DistillConfig

    cfg = DistillConfig.from_recipe("sums").validate()
    assert cfg.teacher == str(sums_models.TEACHER_DIR) and cfg.student == str(sums_models.STUDENT_DIR)
    assert cfg.data == str(sums_models.TRAIN_PATH) and cfg.eval_data == str(sums_models.HELD_PATH)
    # answers must fit: the longest answer in any style, plus eos, within the generation limit
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(sums_models.TEACHER_DIR)
    longest = max(len(tok.encode(c, add_special_tokens=False)) for r in sums_models.load_rows("held")
                  for c in sums.parse_prompt(r["prompt"]).completions().values())
    assert longest + 1 <= cfg.rollout_max_new_tokens, longest
