"""The four-number sums task: its generator and split, its shipped assets, and a student that
can learn it (SFT on the data reaches half the teacher in the benchmark's quick configuration)."""

import json

import pytest

from hpd.tasks import sums, sums4


def test_splits_are_deterministic_disjoint_and_four_numbers():
    train, val, test = sums4.make_splits(0, 800, 50, 100)
    assert (train, val, test) == sums4.make_splits(0, 800, 50, 100)
    assert sums4.make_splits(1, 800, 50, 100) != (train, val, test)
    sigs = [{p.signature for p in part} for part in (train, val, test)]
    assert [len(s) for s in sigs] == [800, 50, 100]
    assert not (sigs[0] & sigs[1] or sigs[0] & sigs[2] or sigs[1] & sigs[2])
    # validation and test do not move when the training pool grows
    _, val2, test2 = sums4.make_splits(0, 2000, 50, 100)
    assert (val2, test2) == (val, test)
    assert all(len(p.values) == 4 and all(1 <= v <= 9 for v in p.values) for part in (train, val, test) for p in part)


def test_styles_are_long_and_two_are_the_teachers():
    p = sums.Problem((7, 3, 9, 4))
    c = p.completions()
    assert c["forward"] == "a: 7\nb: 7+3=10\nc: 10+9=19\nd: 19+4=23\nAnswer: 23"
    assert c["backward"] == "d: 4\nc: 4+9=13\nb: 13+3=16\na: 16+7=23\nAnswer: 23"
    assert c["pairs"] == "a+b = 7+3 = 10\nc+d = 9+4 = 13\n10+13 = 23\nAnswer: 23"
    assert max(sums4.TEACHER_MIX, key=sums4.TEACHER_MIX.get) != "pairs" and sums4.TEACHER_MIX["pairs"] <= 0.1
    with pytest.raises(ValueError):
        sums4.path("held")


def test_assets_match_the_generator_and_are_small():
    manifest = sums4.load_manifest()
    total = sum(p.stat().st_size for p in sums4.SUMS4_DIR.rglob("*") if p.is_file())
    assert total < 5e6, total
    pool, val, test = sums4.make_splits(manifest["seed"], manifest["n_teacher_pool"] + manifest["n_student_pool"],
                                        manifest["n_val"], manifest["n_test"])
    assert sums4.load_rows("train") == [p.row("pairs") for p in pool[: manifest["n_data"]]]
    assert sums4.load_rows("val") == [p.row("pairs") for p in val]
    assert sums4.load_rows("test") == [p.row("pairs") for p in test]
    for split, source in (("train_teacher", "train"), ("test_teacher", "test"), ("train_expert", "train"),
                          ("test_expert", "test")):
        assert [r["prompt"] for r in sums4.load_rows(split)] == [r["prompt"] for r in sums4.load_rows(source)]
    assert min(manifest["min_working_tokens"].values()) >= 30  # long generations
    t, s = manifest["models"]["teacher"], manifest["models"]["student"]
    assert 3 * s["params"] <= t["params"] and t["greedy_accuracy"] >= 0.95
    assert t["style_probability_first50"]["pairs"] < 0.15 < t["style_probability_first50"]["backward"]
    for name in ("teacher", "student"):
        card = (sums4.SUMS4_DIR / name / "README.md").read_text()
        assert f"**{manifest['models'][name]['greedy_accuracy']:.3f}**" in card
        assert json.loads((sums4.SUMS4_DIR / name / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.slow
def test_sft_reaches_half_the_teacher(tmp_path):
    """The benchmark's SFT initialization (its steps, rate and seed) from the raw student."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import hpd
    from benchmarks.evidence import QUICK as plan
    from hpd.tasks import sums_models as sm
    from hpd.train.config import DistillConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to a busy machine
    try:
        cfg = DistillConfig.from_recipe("sums4", {"method": "sft", "steps": plan["sft_init_steps"],
                                                  "lr": plan["sft_init_lr"], "seed": 0, "out": str(tmp_path / "s"),
                                                  "progress": False, "eval_data": "", "eval_every": 0})
        student = hpd.distill(cfg)["student"]
        tok = transformers.AutoTokenizer.from_pretrained(cfg.student)
        rows = sums4.load_rows("test")[:100]
        prompts, refs = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        got = sm.score(prompts, refs, sm.generate_texts(student, tok, prompts,
                                                        max_new_tokens=cfg.rollout_max_new_tokens))
    finally:
        torch.set_num_threads(threads)
    manifest = sums4.load_manifest()["models"]
    assert got["accuracy"] >= 0.5 * manifest["teacher"]["greedy_accuracy"], got["accuracy"]
    assert got["accuracy"] > manifest["student"]["greedy_accuracy"] and got["openings"]["pairs"] > 0.9
