"""Measurements a sums benchmark adds to its results (benchmarks.sums_runner), also to an
earlier results.json through --from-results: how the greedy answers open, and where the
teacher disagrees with the data."""

from __future__ import annotations

import math


def add_openings(bench, results: dict) -> None:
    """Greedy answers of the baselines and of every run's exported student again; fills in
    `openings` (first-line styles), for results written before they were recorded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd.tasks import sums_models as sm

    base = bench.base_config()
    rows = bench.task.rows(bench.task.test)[: results["meta"]["plan"][bench.task.test_rows]]
    prompts, refs = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    teacher, student = bench.baselines
    folders = [(results["baselines"][teacher], base.teacher), (results["baselines"][student], base.student)]
    folders += [(r, r["out"]) for r in results["runs"]]
    for entry, folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        got = sm.score(prompts, refs, sm.generate_texts(model, tok, prompts,
                                                        max_new_tokens=base.rollout_max_new_tokens))
        if abs(got["accuracy"] - entry["greedy"]) > 1e-9:
            print(f"note: {folder}: greedy {got['accuracy']:.3f} now, {entry['greedy']:.3f} recorded")
        entry["openings"] = got["openings"]


def add_teacher_positions(bench, results: dict) -> None:
    """`teacher_on_data` against the SFT-initialized student, for results written before it was
    recorded."""
    results["teacher_on_data"] = teacher_on_data(bench, results["inits"].get("sft-init", {}).get("out", ""))


def teacher_on_data(bench, student: str = "", n: int = 100) -> dict:
    """The teacher's mean probability of the data token at each position of the first `n` test
    answers (position 0 is the answer's first token): where the data and the teacher disagree.
    With a `student` folder, also each position's share of the summed forward KL, reverse KL and
    JSD(0.5) between teacher and student there: how much of each objective that disagreement is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd.data.examples import encode_row

    base = bench.base_config()
    teacher = AutoModelForCausalLM.from_pretrained(base.teacher, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval() if student else None
    tok = AutoTokenizer.from_pretrained(base.teacher)
    totals, counts, tokens = {}, {}, {}
    for row in bench.task.rows(bench.task.test)[:n]:
        ex = encode_row(row, tok)
        values = _position_values(teacher, other, torch.tensor([ex.input_ids]))
        for i in range(ex.prompt_len - 1, len(ex.input_ids) - 1):
            k = i - ex.prompt_len + 1
            for name, v in values.items():
                totals.setdefault(name, {})[k] = totals.get(name, {}).get(k, 0.0) + float(v[i])
            counts[k] = counts.get(k, 0) + 1
            tokens.setdefault(k, tok.convert_ids_to_tokens(ex.input_ids[i + 1]))
    out = {"rows": n, "mean_p_data_token": {k: v / counts[k] for k, v in sorted(totals["p_data_token"].items())},
           "tokens_of_first_row": tokens}
    if other is not None:
        out["student"] = student
        out["share_by_position"] = {name: {k: v / sum(totals[name].values()) for k, v in sorted(totals[name].items())}
                                    for name in ("fkl", "rkl", "jsd")}
    return out


def _position_values(teacher, other, ids) -> dict:
    """Per position of one row: the teacher's probability of the next data token and, with a
    second model, forward KL, reverse KL and JSD(0.5) between the two."""
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].float(), dim=-1)
        values = {"p_data_token": lp.gather(-1, ids[0, 1:, None])[:, 0].exp()}
        if other is not None:
            lq = torch.log_softmax(other(input_ids=ids).logits[0, :-1].float(), dim=-1)
            lm = torch.logaddexp(lp, lq) - math.log(2.0)
            values["fkl"] = (lp.exp() * (lp - lq)).sum(-1)
            values["rkl"] = (lq.exp() * (lq - lp)).sum(-1)
            values["jsd"] = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
    return values
