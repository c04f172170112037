"""Sound working in any mix of styles (hpd.tasks.sums_working), recovery (hpd.tasks.sums_recovery),
and the shipped expert teacher: it continues workings it did not start, and answers a bare
prompt as the teacher does."""

import random

import pytest

from hpd.tasks import sums, sums4
from hpd.tasks.sums_working import finish, next_lines, random_working, shape, sound_prefix, sound_working

P = sums.Problem((7, 3, 9, 4))


def test_every_style_is_sound_at_every_cut_and_finishes_itself():
    for style in sums.STYLES:
        text = P.completion(style)
        assert sound_working(P.prompt(), text)
        assert all(sound_prefix(P.prompt(), text[:k]) for k in range(len(text)))
        lines = text.split("\n")
        assert finish(P, [], style) == lines
        for j in range(1, len(lines) - 1):  # from any of its own lines, a style goes on as itself
            assert finish(P, lines[:j]) == lines[j:]


def test_mixed_working_is_sound_and_wrong_working_is_not():
    prompt = P.prompt()
    assert sound_working(prompt, "a: 7\nb: 7+3=10\nc+d = 9+4 = 13\n10+13 = 23\nAnswer: 23")
    assert sound_working(prompt, "a+b = 7+3 = 10\nc: 10+9=19\nd: 19+4=23\nAnswer: 23")
    for wrong in ("a: 1 = 4+3", "a: 7\nb: 7+3=11", "a+b = 7+3 = 10\na: 10+7=17", "a+b = 7+4",
                  "a: 7\nAnswer: 7", "a+b = 7+3 = 10\nc+d = 9+4 = 13\n10+13 = 23\nAnswer: 24"):
        assert not sound_prefix(prompt, wrong), wrong
    assert not sound_working(prompt, "a: 7\nb: 7+3=10")  # sound, but not finished
    assert finish(P, ["a: 7", "c+d = 9+4 = 13"]) == ["b: 7+3=10", "13+10 = 23", "Answer: 23"]
    assert finish(P, ["a+b = 7+3 = 10"], "backward") == ["d: 10+4=14", "c: 14+9=23", "Answer: 23"]
    with pytest.raises(ValueError, match="not a sound working"):
        finish(P, ["a: 8"])
    assert [shape(prompt, t) for t in ("a", "a: 7\nb: 7+", "a+b = 7+3 = 10\n", "a: 7\nc+d = 9+")] == \
        ["first line", "running", "pairs", "mixed"]


def test_random_workings_and_continuation_rows_are_sound():
    transformers = pytest.importorskip("transformers")
    from hpd.tasks.sums_recovery import continuation_rows

    rng = random.Random(0)
    problems = [sums.Problem(tuple(rng.randint(1, 9) for _ in range(4))) for _ in range(60)]
    kinds = set()
    for p in problems:
        lines = [line for line, _ in random_working(p, rng)]
        assert sound_working(p.prompt(), "\n".join(lines))
        kinds |= {shape(p.prompt(), "\n".join(lines[:k]) + "\n") for k in range(1, len(lines))}
    assert "mixed" in kinds and "running" in kinds and "pairs" in kinds
    tok = transformers.AutoTokenizer.from_pretrained(sums4.TEACHER_DIR)
    for row in continuation_rows(problems, tok, random.Random(1)):
        ids = tok(row["completion"], add_special_tokens=False)["input_ids"]
        given = tok.decode(ids[: row["given"]])
        assert 0 < row["given"] < len(ids) and row["completion"].startswith(given)
        assert sound_prefix(row["prompt"], given) and sound_working(row["prompt"], row["completion"])


def test_breaks_say_where_answers_go_wrong():
    from hpd.tasks.sums_recovery import breaks

    prompt = P.prompt()
    texts = [P.completion("pairs"),  # sound
             "a: 7\n3+3 = 7\nAnswer: 10",  # the teacher's opening, wrong on the line after it
             "a: 5\nb: 5+3=8\nAnswer: 8",  # the teacher's opening, wrong on its first line (a is 7)
             "a: 1 = 4+3 = 6\nAnswer: 6",  # no opening of the teacher's (nor any style's)
             P.completion("forward")]  # the teacher's opening, sound throughout
    got = breaks([prompt] * 5, texts)
    assert got == {"sound": 0.4, "teacher_opening": 0.6, "wrong_first_line": 0.2, "wrong_second_line": 0.2}


def test_next_lines_know_every_kind_of_step():
    from hpd.tasks.sums_working import walk

    kinds = {k for k, _ in next_lines(walk(P, ["a: 7", "c+d = 9+4 = 13"])).values()}
    assert kinds == {"start", "single", "extend", "merge"}  # one number left (b): no pair
    assert {k for k, _ in next_lines(walk(P, ["a+b = 7+3 = 10", "c+d = 9+4 = 13", "10+13 = 23"])).values()} == \
        {"answer"}


def test_the_expert_recovers_where_the_teacher_does_not():
    """The figures of the expert's card, measured again (fixed seed, greedy): the expert recovers
    at least 0.9 of the students' sound prefixes and of the hand-made mixed-style ones, with its
    own accuracy unchanged; the shipped teacher, measured alike, does not recover the mixed ones."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hpd.tasks import sums_recovery as rec

    manifest = sums4.load_manifest()["models"]["expert"]
    problems = [sums.parse_prompt(r["prompt"]) for r in sums4.load_rows("test")[:100]]
    tok = transformers.AutoTokenizer.from_pretrained(sums4.EXPERT_DIR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = {}
        for name, folder in sums4.TEACHERS.items():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            got[name] = rec.measure(model, tok, problems, sums4.path("prefixes"))
    finally:
        torch.set_num_threads(threads)
    expert, teacher = got["expert"], got["teacher"]
    assert expert["own_accuracy"] == teacher["own_accuracy"] == 1.0
    assert expert["students"]["recovery"] >= 0.9 and expert["hand-made"]["recovery"] >= 0.9
    assert teacher["hand-made"]["recovery"] < 0.8
    for name, recorded in (("expert", manifest["recovery"]), ("teacher", manifest["teacher_recovery"])):
        for what in ("students", "hand-made"):
            assert got[name][what]["prefixes"] == recorded[what]["prefixes"]
            assert abs(got[name][what]["recovery"] - recorded[what]["recovery"]) <= 0.01, (name, what)
    assert manifest["greedy_accuracy"] == 1.0 and manifest["style_probability_first50"]["pairs"] < 0.15
