"""The tables of benchmarks.evidence, per start: the learning-rate grid, final performance, the
known results, agreement with TRL, efficiency at equal steps and at equal time, stability;
before them the starting points and the teacher's recovery (benchmarks.sums_recovery). The
shared pieces (series, stability, number formats) are benchmarks.sums_report's.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.sums_report import (
    DEFINITIONS,
    definitions,
    diagnostics_table,
    mean_shares,
    ms,
    shares,
    stability_table,
)

PER_START_DEFINITIONS = """
- exact match at equal time: each run's last curve point (first test prompts, greedy) whose
  training seconds are at most the mean training seconds of the same start's sft runs;
  the cheapest method's budget, so every method is compared at the time sft needs.
- accuracy at equal training time: each run's last curve point whose training seconds
  (rollouts included) are at most a budget, the longest training time over all steps of
  one method's runs (hpd's, which needs no rollouts, and the on-policy rows'); steps done
  by then: how many steps each run had finished within it, averaged over seeds.
- a known result "holds on every seed" when the difference, paired by seed, is positive for
  each seed; otherwise the mean and spread say how far it is from holding.
"""

KNOWN = [
    ("(a) KD beats SFT on the same data", "fkl", "sft"),
    ("(a) KD beats SFT on the same data (TRL's forward KL)", "trl gkd fkl (off-policy)", "sft"),
    ("(b) on-policy beats off-policy (hpd's jsd)", "jsd (on-policy)", "jsd (off-policy)"),
    ("(b) on-policy beats off-policy (TRL's GKD)", "trl gkd (on-policy)", "trl gkd (off-policy)"),
]
AGREEMENT = [("jsd (off-policy)", "trl gkd (off-policy)"), ("jsd (on-policy)", "trl gkd (on-policy)"),
             ("fkl", "trl gkd fkl (off-policy)")]
# the runs whose training time sets the budgets of the equal-time table: HPD's, which needs no
# rollouts, and the on-policy rows'
REFERENCES = ("hpd", "jsd (on-policy)", "trl gkd (on-policy)")
TITLES = {"sft-init": "the SFT-initialized student", "raw": "the raw student",
          "teacher-style": "the control: SFT-initialized on the teacher's own answers, and trained on them"}


def finals(results: dict, start: str, methods: list) -> dict:
    """Each method's final (test) runs from `start`, by seed."""
    by = {m: [r for r in results["runs"] if r["phase"] == "final" and r["start"] == start and r["method"] == m]
          for m in methods}
    return {m: sorted(rs, key=lambda r: r["seed"]) for m, rs in by.items() if rs}


def at_time(run: dict, budget: float) -> float | None:
    points = [e for e in run["series"]["evals"] if e["seconds"] <= budget + 1e-9]
    return points[-1]["accuracy"] if points else None


def paired(a: list, b: list, key: str = "greedy") -> list:
    seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    va, vb = ({r["seed"]: r[key] for r in rs} for rs in (a, b))
    return [va[s] - vb[s] for s in seeds]


def known_results(by: dict) -> list:
    lines = ["| known result | greedy difference (mean ± sd over seeds) | per seed | sampled difference | verdict |",
             "|---|---|---|---|---|"]
    for label, better, worse in KNOWN:
        if better not in by or worse not in by:
            continue
        d, ds = paired(by[better], by[worse]), paired(by[better], by[worse], "sampled")
        verdict = ("holds on every seed" if all(x > 0 for x in d) else
                   "holds on average" if statistics.fmean(d) > 0 else "does not hold")
        lines.append(f"| {label}: {better} − {worse} | {ms(d)} | {', '.join(f'{x:+.3f}' for x in d)} | "
                     f"{ms(ds)} | {verdict} |")
    return lines


def agreement(by: dict) -> list:
    """hpd's jsd rows against TRL's, beside the spread of each over seeds."""
    lines = ["| hpd row − TRL row | greedy difference (mean ± sd) | sampled difference | sd of hpd's row | "
             "sd of TRL's row |", "|---|---|---|---|---|"]
    for ours, theirs in AGREEMENT:
        if ours not in by or theirs not in by:
            continue
        d, ds = paired(by[ours], by[theirs]), paired(by[ours], by[theirs], "sampled")
        sd = [statistics.stdev([r["greedy"] for r in by[m]]) if len(by[m]) > 1 else 0.0 for m in (ours, theirs)]
        lines.append(f"| {ours} − {theirs} | {ms(d)} | {ms(ds)} | {sd[0]:.3f} | {sd[1]:.3f} |")
    return lines


def _starting_points(results: dict) -> list:
    meta, plan = results["meta"], results["meta"]["plan"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; commit {meta['commit']}; {meta['machine']}; torch {meta['torch']}, "
        f"TRL {meta['trl']}; total {meta['total_seconds'] / 60:.1f} min.  ",
        f"{plan['steps']} optimizer steps per run, batch 32; learning rates chosen on {plan['val_rows']} validation "
        f"prompts at seed {plan['selection_seed']} from the grids {plan['grid']}; the table's seeds {plan['seeds']}, "
        f"mean ± standard deviation over them. Greedy exact match on {plan['test_rows']} test prompts; sampled: "
        f"temperature 1, {plan['samples']} samples on each of the first {plan['sample_rows']}.",
        *([f"Note: {meta['note']}."] if meta.get("note") else []),
        *[f"Added later, from the same starting students under the same plan: {', '.join(a['methods'])}, by "
          f"`{a['command']}` ({a['date']}, commit {a['commit']}, {a['total_seconds'] / 60:.1f} min)."
          for a in meta.get("added", [])],
        "", "### Starting points", "",
        "| student | test greedy | test sampled (T=1) | KL to teacher, teacher's text | KL to teacher, data's text | "
        "validation greedy | greedy first line fwd / bwd / pairs / other |", "|---|---|---|---|---|---|---|",
    ]
    starts = dict(results["baselines"])
    for start, init in results["inits"].items():
        data = "the teacher's own answers" if start == "teacher-style" else "the data"
        starts[f"{start}: SFT-initialized on {data} ({init['steps']} steps of sft, lr {init['lr']:g})"] = init
    for name, b in starts.items():
        lines.append(f"| {name} | {b['greedy']:.3f} | {b['sampled']:.3f} | {b['kl_teacher_text']:.3f} | "
                     f"{b['kl_data_text']:.3f} | {b['val_greedy']:.3f} | {shares(b['openings'])} |")
    return lines + _teacher_on_data(results.get("teacher_on_data"))


def _teacher_on_data(t: dict | None) -> list:
    """Where the teacher disagrees with the data, and how much of each objective falls there."""
    if not t:
        return []
    mean = {int(k): v for k, v in t["mean_p_data_token"].items()}
    names = {int(k): v for k, v in t["tokens_of_first_row"].items()}
    low = [k for k, v in mean.items() if v < 0.9]
    rest = [v for k, v in mean.items() if k not in low]
    line = (f"The teacher on the data (first {t['rows']} test answers, pairs style): mean probability of the "
            "data token below 0.9 at answer position(s) "
            + ", ".join(f"{k} (`{names.get(k, '?')}`: {mean[k]:.3f})" for k in low)
            + (f"; at the other {len(rest)} positions between {min(rest):.3f} and {max(rest):.3f}." if rest else "."))
    if t.get("share_by_position"):
        by = {m: {int(k): v for k, v in d.items()} for m, d in t["share_by_position"].items()}
        line += (" Between the teacher and the SFT-initialized student on the same text, the share of each "
                 "objective's sum over positions that falls on position(s) " + ", ".join(map(str, low)) + ": "
                 + ", ".join(f"{m} {sum(d.get(k, 0.0) for k in low):.2f}" for m, d in by.items()) + ".")
    return ["", line]


def _grid_table(results: dict, start: str, methods: list) -> list:
    grid = [r for r in results["runs"] if r["phase"] == "grid" and r["start"] == start]
    if not grid:
        return []
    chosen, rates = results["chosen_lr"][start], sorted({r["lr"] for r in grid})
    lines = [f"#### Learning rates (validation greedy exact match, seed {results['meta']['plan']['selection_seed']})",
             "", "| method | " + " | ".join(f"lr {x:g}" for x in rates) + " | chosen |",
             "|---|" + "---|" * len(rates) + "---|"]
    for m in methods:
        got = {r["lr"]: r["val_greedy"] for r in grid if r["method"] == m}
        if got:
            edge = " (edge)" if chosen[m] in (rates[0], rates[-1]) else ""
            lines.append(f"| {m} | " + " | ".join(f"{got[x]:.3f}" if x in got else "-" for x in rates)
                         + f" | {chosen[m]:g}{edge} |")
    return lines + [""]


def _final_table(by: dict) -> list:
    lines = ["#### Final performance (test split)", "",
             "| method | lr | greedy exact match | sampled exact match (T=1) | KL to teacher, teacher's text | "
             "KL to teacher, data's text | greedy answers in full style fwd / bwd / pairs / other | "
             "greedy first line fwd / bwd / pairs / other |", "|---|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        lines.append(f"| {m} | {rs[0]['lr']:g} | {ms([r['greedy'] for r in rs])} | {ms([r['sampled'] for r in rs])} | "
                     f"{ms([r['kl_teacher_text'] for r in rs])} | {ms([r['kl_data_text'] for r in rs])} | "
                     f"{shares(mean_shares(rs, 'styles'))} | {shares(mean_shares(rs, 'openings'))} |")
    return lines


def _efficiency_table(by: dict) -> list:
    """Time, rollout steps, FLOPs, and the curve's exact match at sft's training time and at the end."""
    budget = statistics.fmean(r["series"]["seconds"][-1] for r in by["sft"]) if "sft" in by else None
    lines = ["", "#### Efficiency", "",
             "| method | training time (s) | wall time (s) | ms per step | steps with rollouts | rows from rollouts | "
             "FLOPs (1e12) | "
             f"curve exact match at sft's training time ({budget or 0:.0f} s) | curve exact match at the end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        train = [r["series"]["seconds"][-1] for r in rs]
        share = [statistics.fmean(r["series"].get("rollout_share") or r["series"]["on_policy"]) for r in rs]
        per_step = [1000 * r["series"]["seconds"][-1] / max(len(r["series"]["steps"]), 1) for r in rs]
        fl = [r["flops"] / 1e12 for r in rs if r.get("flops")]
        eq = [a for a in (at_time(r, budget) for r in rs) if a is not None] if budget else []
        end = [r["series"]["evals"][-1]["accuracy"] for r in rs if r["series"]["evals"]]
        lines.append(f"| {m} | {ms(train, 0)} | {ms([r['seconds'] for r in rs], 0)} | {ms(per_step, 0)} | "
                     f"{statistics.fmean(sum(r['series']['on_policy']) for r in rs):.0f} | {ms(share, 2)} | "
                     f"{ms(fl, 2) if fl else '-'} | {ms(eq) if eq else '-'} | {ms(end) if end else '-'} |")
    return lines


def _equal_time_table(by: dict) -> list:
    """Each run's curve at the training time (rollouts included) that hpd's runs and the on-policy
    rows need for all their steps (the longest of a method's runs), beside the end of the curve
    (equal steps)."""
    refs = [(m, max(r["series"]["seconds"][-1] for r in by[m])) for m in REFERENCES if m in by]
    if not refs:
        return []
    lines = ["", "#### Accuracy at equal training time", "",
             "| method | training time, all steps (s) | curve exact match at the end (equal steps) | "
             + " | ".join(f"at {m}'s time ({t:.0f} s) | steps done by then" for m, t in refs) + " |",
             "|---|---|---|" + "---|---|" * len(refs)]
    for m, rs in by.items():
        if not all(r["series"]["evals"] for r in rs):
            continue
        end = [r["series"]["evals"][-1]["accuracy"] for r in rs]
        cells = [ms([r["series"]["seconds"][-1] for r in rs], 0), ms(end)]
        for _, budget in refs:
            got = [a for a in (at_time(r, budget) for r in rs) if a is not None]
            done = [sum(1 for t in r["series"]["seconds"] if t <= budget) for r in rs]
            cells += [ms(got) if got else "-", f"{statistics.fmean(done):.0f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def recovery_table(rec: dict | None) -> list:
    """The recovery of each shipped teacher on the prefixes of the run's recovery students."""
    if not rec:
        return []
    teachers = rec["teachers"]
    names = list(teachers)
    lines = ["", "### Recovery: the teacher continuing the students' own answers", "",
             f"Students distilled from `{rec['students_teacher']}`, checkpoints {rec['checkpoints']}; each answers the "
             f"first {rec['rows']} test prompts greedily and by sampling, each answer cut after a random token; "
             "only prefixes whose working is still sound are continued (greedy). Recovery: the share that ends "
             "on the right answer.", "",
             "| prefixes | sound of cut | " + " | ".join(f"recovery, {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names),
             "| (none: the teacher's own accuracy) | - | "
             + " | ".join(f"{teachers[n]['own_accuracy']:.3f}" for n in names) + " |"]
    first = teachers[names[0]]
    rows = [("all the students' prefixes", "students", None), ("hand-made mixed-style prefixes", "hand-made", None)]
    rows += [(f"{source}", "students", ("by_source", source)) for source in first["students"]["by_source"]]
    rows += [(f"students' prefixes, shape: {shape}", "students", ("by_shape", shape))
             for shape in first["students"]["by_shape"]]
    for label, what, key in rows:
        got = [teachers[n][what] if key is None else teachers[n][what][key[0]].get(key[1], {}) for n in names]
        cut = f"{got[0].get('prefixes', 0)} of {got[0]['cut']}" if "cut" in got[0] else f"{got[0].get('prefixes', 0)}"
        vals = [f"{g['recovery']:.3f}" if g.get("recovery") is not None else "-" for g in got]
        lines.append(f"| {label} | {cut} | " + " | ".join(vals) + " |")
    return lines + _breaks_table(rec.get("answers"))


def _breaks_table(answers: dict | None) -> list:
    """Where the recovery students' whole answers stop being sound."""
    if not answers:
        return []
    lines = ["", "The recovery students' whole answers (shares of all answers):", "",
             "| student | sound throughout | open in the teacher's style | of which wrong on the first line | "
             "wrong on the line after it |", "|---|---|---|---|---|"]
    for source, a in answers.items():
        lines.append(f"| {source} | {a['sound']:.2f} | {a['teacher_opening']:.2f} | {a['wrong_first_line']:.2f} | "
                     f"{a['wrong_second_line']:.2f} |")
    return lines


def markdown_per_start(results: dict, methods: list) -> str:
    """The tables of evidence: the starting points, then per start the grid, the final test
    scores, the known results, hpd against TRL, efficiency, stability and HPD's diagnostics."""
    lines = _starting_points(results) + recovery_table(results.get("recovery"))
    for start in results["chosen_lr"]:
        by = finals(results, start, methods)
        lines += ["", f"## Start: {TITLES.get(start, start)}", "", *_grid_table(results, start, methods),
                  *_final_table(by), "", "#### Known results, paired by seed", "", *known_results(by), "",
                  "#### hpd's rows against TRL's GKDTrainer, paired by seed", "", *agreement(by)]
        lines += _efficiency_table(by) + _equal_time_table(by) + stability_table(by, "####")
        lines += diagnostics_table(by, "####")
    lines += ["", *definitions(DEFINITIONS, PER_START_DEFINITIONS)]
    return "\n".join(lines) + "\n"


def write_per_start(results: dict, methods: list, out: Path) -> dict:
    """OUT/results.md and one figure per start, OUT/curves-<start>.png."""
    from benchmarks.sums_plot import plot

    out.mkdir(parents=True, exist_ok=True)
    text = markdown_per_start(results, methods)
    (out / "results.md").write_text(text)
    print("\n" + text)
    try:
        for start in results["chosen_lr"]:
            runs = [r for r in results["runs"] if r["phase"] == "final" and r["start"] == start]
            plot({"runs": runs}, methods, out / f"curves-{start}.png")
        print(f"wrote {out / 'results.md'} and the figures")
    except ImportError as e:
        print(f"no figures ({e}); wrote {out / 'results.md'}")
    return results
