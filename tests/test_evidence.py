"""benchmarks.evidence: the rate choice, TRL's inputs, and a smoke run with two methods."""

import json
from pathlib import Path

import pytest

from benchmarks import evidence
from benchmarks.sums_runner import choose, searched


def test_each_method_gets_its_best_rate_and_trl_rows_take_jsds():
    grid = [{"method": m, "lr": lr, "val_greedy": acc} for m, lr, acc in [
        ("sft", 1e-4, 0.5), ("sft", 3e-4, 0.7), ("sft", 1e-3, 0.6),
        ("jsd (on-policy)", 1e-4, 0.4), ("jsd (on-policy)", 3e-4, 0.4), ("jsd (on-policy)", 1e-3, 0.1)]]
    methods = ["sft", "jsd (on-policy)", "trl gkd (on-policy)"]
    assert searched(evidence.METHODS, methods) == ["sft", "jsd (on-policy)"]  # TRL's row is not searched
    # unless jsd's row is absent
    assert searched(evidence.METHODS, ["trl gkd (on-policy)"]) == ["trl gkd (on-policy)"]
    # a tie goes to the smaller rate; TRL's row takes the rate of hpd's row of the same objective
    assert choose(evidence.METHODS, grid, methods) == {"sft": 3e-4, "jsd (on-policy)": 1e-4,
                                                      "trl gkd (on-policy)": 1e-4}


def test_trl_rows_see_hpds_token_ids():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hpd.data.examples import encode_row
    from hpd.tasks import sums4

    from benchmarks import sums_trl as trl_inputs

    tok = transformers.AutoTokenizer.from_pretrained(sums4.STUDENT_DIR)
    rows = sums4.load_rows("train")[:3] + sums4.load_rows("train_teacher")[:2]
    batch = trl_inputs.collator(tok)(rows)
    for i, row in enumerate(rows):
        ex = encode_row(row, tok)
        n = len(ex.input_ids)
        assert batch["input_ids"][i, :n].tolist() == ex.input_ids and int(batch["attention_mask"][i].sum()) == n
        want = [t if m else -100 for t, m in zip(ex.input_ids, ex.loss_mask)]
        assert batch["labels"][i, :n].tolist() == want and (batch["labels"][i, n:] == -100).all()
        p = ex.prompt_len  # prompts left-padded, as TRL's generation reads them
        assert batch["prompts"][i, -p:].tolist() == ex.input_ids[:p]
        assert int(batch["prompt_attention_mask"][i].sum()) == p and batch["prompt_attention_mask"][i, -1] == 1
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.slow
def test_smoke_two_methods(tmp_path, keep_torch_threads):
    results = evidence.main(["--methods", "sft", "hpd", "--starts", "sft-init", "--steps", "4", "--seeds", "0",
                             "--grid-sft-init", "1e-4", "3e-4", "--sft-init-steps", "4", "--eval-every", "2",
                             "--curve-rows", "2", "--val-rows", "4", "--test-rows", "4", "--samples", "2",
                             "--sample-rows", "2", "--recovery-rows", "3", "--recovery-steps", "2", "4",
                             "--out", str(tmp_path)])
    grid = [r for r in results["runs"] if r["phase"] == "grid"]
    final = [r for r in results["runs"] if r["phase"] == "final"]
    assert sorted((r["method"], r["lr"]) for r in grid) == [("hpd", 1e-4), ("hpd", 3e-4), ("sft", 1e-4), ("sft", 3e-4)]
    assert all(r["seed"] == 100 and 0.0 <= r["val_greedy"] <= 1.0 for r in grid)
    assert [r["method"] for r in final] == ["sft", "hpd"]
    for r in final:
        assert r["lr"] == results["chosen_lr"]["sft-init"][r["method"]] and r["start"] == "sft-init"
        assert 0.0 <= r["greedy"] <= 1.0 and r["kl_teacher_text"] >= 0.0 and r["flops"] > 0
        assert r["series"]["steps"] == [1, 2, 3, 4] and [e["step"] for e in r["series"]["evals"]] == [0, 2, 4]
    init = results["inits"]["sft-init"]
    assert init["steps"] == 4 and 0.0 <= init["greedy"] <= 1.0 and Path(init["out"], "config.json").is_file()
    rec = results["recovery"]
    assert rec["checkpoints"] == [2, 4] and rec["students_teacher"] == "expert"
    for name in ("expert", "teacher"):
        got = rec["teachers"][name]
        assert 0.0 <= got["own_accuracy"] <= 1.0 and got["hand-made"]["prefixes"] == 3
        # five students (sft-init, fkl and on-policy jsd at two checkpoints), each a greedy and a sampled answer
        assert got["students"]["cut"] == 5 * 2 * 3 and len(got["students"]["by_source"]) == 10
    assert results["meta"]["teacher"] == "expert"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["chosen_lr"] == results["chosen_lr"] and len(saved["runs"]) == 6
    table = (tmp_path / "results.md").read_text()
    for needle in ("Starting points", "SFT-initialized", "| sft |", "| hpd |", "Known results", "chosen",
                   "Efficiency", "Stability", "Recovery", "equal training time"):
        assert needle in table, needle
    # a method added later: run under the file's plan from its SFT-initialized student, written back into it
    added = evidence.main(["--add-to", str(tmp_path / "results.json"), "--methods", "hpd (rows)", "--starts",
                           "sft-init", "--out", str(tmp_path)])
    new = [r for r in added["runs"] if r["method"] == "hpd (rows)"]
    assert [(r["phase"], r["lr"]) for r in new if r["phase"] == "grid"] == [("grid", 1e-4), ("grid", 3e-4)]
    assert [r["seed"] for r in new if r["phase"] == "final"] == [0] and len(added["runs"]) == 9
    assert added["chosen_lr"]["sft-init"].keys() == {"sft", "hpd", "hpd (rows)"}
    assert added["meta"]["added"][0]["methods"] == ["hpd (rows)"] and added["inits"] == results["inits"]
    # the file holds the runs as returned (JSON has lists where they hold tuples)
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == json.loads(json.dumps(added["runs"]))
    assert "| hpd (rows) |" in (tmp_path / "results.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves-sft-init.png").stat().st_size > 10_000
