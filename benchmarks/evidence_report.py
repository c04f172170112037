"""The tables and figures of evidence.py: starting points, the learning-rate grid, final
performance, the known results, efficiency and stability, per start.

Series, spikes, step noise and FLOPs are defined as in when_hpd_helps_report.py (printed
under the table). Two additions:
- exact match at equal time: each run's last curve point (first test prompts, greedy) whose
  training seconds are at most the mean training seconds of the same start's sft runs;
  the cheapest method's budget, so every method is compared at the time sft needs.
- a known result "holds on every seed" when the difference, paired by seed, is positive for
  each seed; otherwise the mean and spread say how far it is from holding.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import when_hpd_helps_report as base
from when_hpd_helps_report import flops, ms, series, stability  # noqa: F401  (series and flops: for evidence.py)

KNOWN = [
    ("(a) KD beats SFT on the same data", "fkl", "sft"),
    ("(a) KD beats SFT on the same data (TRL's forward KL)", "trl gkd fkl (off-policy)", "sft"),
    ("(b) on-policy beats off-policy (hpd's jsd)", "jsd (on-policy)", "jsd (off-policy)"),
    ("(b) on-policy beats off-policy (TRL's GKD)", "trl gkd (on-policy)", "trl gkd (off-policy)"),
]
AGREEMENT = [("jsd (off-policy)", "trl gkd (off-policy)"), ("jsd (on-policy)", "trl gkd (on-policy)"),
             ("fkl", "trl gkd fkl (off-policy)")]


TITLES = {"sft-init": "the SFT-initialized student", "raw": "the raw student",
          "teacher-style": "the control: SFT-initialized on the teacher's own answers, and trained on them"}


def inits_of(results: dict) -> dict:
    """The SFT-initialized starts of a results file (an early one kept only "sft_init")."""
    return results.get("inits") or ({"sft-init": results["sft_init"]} if results.get("sft_init") else {})


def _shares(d: dict) -> str:
    if not d:
        return "-"
    return " / ".join(f"{d.get(k, 0.0):.2f}" for k in ("forward", "backward", "pairs", "other"))


def _mean_shares(runs: list, key: str) -> dict:
    return {k: statistics.fmean(r[key].get(k, 0.0) for r in runs) for k in ("forward", "backward", "pairs", "other")}


def finals(results: dict, start: str, methods: list) -> dict:
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


def markdown(results: dict, methods: list) -> str:
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
        "", "### Starting points", "",
        "| student | test greedy | test sampled (T=1) | KL to teacher, teacher's text | KL to teacher, data's text | "
        "validation greedy | greedy first line fwd / bwd / pairs / other |", "|---|---|---|---|---|---|---|",
    ]
    starts = dict(results["baselines"])
    for start, init in inits_of(results).items():
        data = "the teacher's own answers" if start == "teacher-style" else "the data"
        starts[f"{start}: SFT-initialized on {data} ({init['steps']} steps of sft, lr {init['lr']:g})"] = init
    for name, b in starts.items():
        lines.append(f"| {name} | {b['greedy']:.3f} | {b['sampled']:.3f} | {b['kl_teacher_text']:.3f} | "
                     f"{b['kl_data_text']:.3f} | {b['val_greedy']:.3f} | {_shares(b['openings'])} |")
    if results.get("teacher_on_data"):
        t = results["teacher_on_data"]
        mean = {int(k): v for k, v in t["mean_p_data_token"].items()}
        names = {int(k): v for k, v in t["tokens_of_first_row"].items()}
        low = [k for k, v in mean.items() if v < 0.9]
        rest = [v for k, v in mean.items() if k not in low]
        lines += ["", f"The teacher on the data (first {t['rows']} test answers, pairs style): mean probability of the "
                  "data token below 0.9 at answer position(s) " + ", ".join(
                      f"{k} (`{names.get(k, '?')}`: {mean[k]:.3f})" for k in low)
                  + (f"; at the other {len(rest)} positions between {min(rest):.3f} and {max(rest):.3f}." if rest else ".")]
        if t.get("share_by_position"):
            shares = {m: {int(k): v for k, v in d.items()} for m, d in t["share_by_position"].items()}
            lines[-1] += (" Between the teacher and the SFT-initialized student on the same text, the share of each "
                          "objective's sum over positions that falls on position(s) " + ", ".join(map(str, low)) + ": "
                          + ", ".join(f"{m} {sum(d.get(k, 0.0) for k in low):.2f}" for m, d in shares.items()) + ".")
    for start, chosen in results["chosen_lr"].items():
        by = finals(results, start, methods)
        grid = [r for r in results["runs"] if r["phase"] == "grid" and r["start"] == start]
        title = TITLES.get(start, start)
        lines += ["", f"## Start: {title}", ""]
        if grid:
            rates = sorted({r["lr"] for r in grid})
            lines += [f"#### Learning rates (validation greedy exact match, seed {plan['selection_seed']})", "",
                      "| method | " + " | ".join(f"lr {x:g}" for x in rates) + " | chosen |",
                      "|---|" + "---|" * len(rates) + "---|"]
            for m in methods:
                got = {r["lr"]: r["val_greedy"] for r in grid if r["method"] == m}
                if got:
                    edge = " (edge)" if chosen[m] in (rates[0], rates[-1]) else ""
                    lines.append(f"| {m} | " + " | ".join(f"{got[x]:.3f}" if x in got else "-" for x in rates)
                                 + f" | {chosen[m]:g}{edge} |")
            lines.append("")
        lines += ["#### Final performance (test split)", "",
                  "| method | lr | greedy exact match | sampled exact match (T=1) | KL to teacher, teacher's text | "
                  "KL to teacher, data's text | greedy answers in full style fwd / bwd / pairs / other | "
                  "greedy first line fwd / bwd / pairs / other |", "|---|---|---|---|---|---|---|---|"]
        for m, rs in by.items():
            lines.append(f"| {m} | {rs[0]['lr']:g} | {ms([r['greedy'] for r in rs])} | {ms([r['sampled'] for r in rs])} | "
                         f"{ms([r['kl_teacher_text'] for r in rs])} | {ms([r['kl_data_text'] for r in rs])} | "
                         f"{_shares(_mean_shares(rs, 'styles'))} | {_shares(_mean_shares(rs, 'openings'))} |")
        lines += ["", "#### Known results, paired by seed", "", *known_results(by), "",
                  "#### hpd's rows against TRL's GKDTrainer, paired by seed", "", *agreement(by)]
        budget = statistics.fmean(r["series"]["seconds"][-1] for r in by["sft"]) if "sft" in by else None
        lines += ["", "#### Efficiency", "",
                  "| method | training time (s) | wall time (s) | ms per step | rollout steps | FLOPs (1e12) | "
                  f"curve exact match at sft's training time ({budget or 0:.0f} s) | curve exact match at the end |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, rs in by.items():
            train = [r["series"]["seconds"][-1] for r in rs]
            per_step = [1000 * r["series"]["seconds"][-1] / max(len(r["series"]["steps"]), 1) for r in rs]
            fl = [r["flops"] / 1e12 for r in rs if r.get("flops")]
            eq = [a for a in (at_time(r, budget) for r in rs) if a is not None] if budget else []
            end = [r["series"]["evals"][-1]["accuracy"] for r in rs if r["series"]["evals"]]
            lines.append(f"| {m} | {ms(train, 0)} | {ms([r['seconds'] for r in rs], 0)} | {ms(per_step, 0)} | "
                         f"{statistics.fmean(sum(r['series']['on_policy']) for r in rs):.0f} | "
                         f"{ms(fl, 2) if fl else '-'} | {ms(eq) if eq else '-'} | {ms(end) if end else '-'} |")
        lines += ["", "#### Stability", "",
                  "| method | grad-norm CV (2nd half) | loss CV (2nd half) | final loss, sd across seeds | "
                  "grad-norm spikes per run | more if offline and rollout steps are not told apart | "
                  "largest grad norm |", "|---|---|---|---|---|---|---|"]
        for m, rs in by.items():
            s = stability(rs)
            lines.append(f"| {m} | {s['grad_cv']:.3f} | {s['loss_cv']:.3f} | {s['loss_seed_sd']:.4f} | "
                         f"{s['spikes_same_kind']:.1f} | {s['spikes'] - s['spikes_same_kind']:+.1f} | "
                         f"{s['max_grad']:.2f} |")
        diag = []
        for m, rs in by.items():
            vals = {}
            for k in base.DIAGNOSTICS:
                per = [r["series"]["diagnostics"].get(k, []) for r in rs]
                if not all(per):
                    continue
                first = [v for p in per for _, v in p[: max(1, len(p) // 10)]]
                last = [v for p in per for _, v in p[-max(1, len(p) // 10):]]
                vals[k] = f"{statistics.fmean(first):.3f} → {statistics.fmean(last):.3f}"
            if vals:
                diag.append(f"| {m} | " + " | ".join(vals.get(k, "-") for k in base.DIAGNOSTICS) + " |")
        if diag:
            lines += ["", "#### HPD diagnostics (first 10% of steps → last 10%, mean over seeds)", "",
                      "| method | share of samples s != y | share of negative w_y | share of active w_s |",
                      "|---|---|---|---|", *diag]
    control = [r for r in results["runs"] if r["phase"] == "control"]
    if control:
        by = {}
        for r in sorted(control, key=lambda r: r["seed"]):
            by.setdefault(r["method"], []).append(r)
        init = results["control_init"]
        lines += ["", "## Control with borrowed rates: the teacher's own answers as data", "",
                  "`train_teacher.jsonl` (the teacher's sampled answers to the same prompts) in place of the "
                  f"pairs-style data: the raw student SFT-initialized on it ({init['steps']} steps, "
                  f"lr {init['lr']:g}: test greedy {init['greedy']:.3f}, first line "
                  f"{_shares(init['openings'])}), then each method at the rate chosen for the sft-init start "
                  "(not on this data: superseded by the `teacher-style` start, which has its own grid).", "",
                  "| method | lr | greedy exact match | sampled exact match (T=1) | KL to teacher, teacher's text | "
                  "greedy first line fwd / bwd / pairs / other |", "|---|---|---|---|---|---|"]
        for m, rs in by.items():
            lines.append(f"| {m} | {rs[0]['lr']:g} | {ms([r['greedy'] for r in rs])} | "
                         f"{ms([r['sampled'] for r in rs])} | {ms([r['kl_teacher_text'] for r in rs])} | "
                         f"{_shares(_mean_shares(rs, 'openings'))} |")
        lines += ["", *known_results(by)[:4]]
    lines += ["", "Definitions: " + " ".join(base.__doc__.split("Definitions (also printed under the table):")[1].split()),
              " ".join(__doc__.split("Two additions:")[1].split())]
    return "\n".join(lines) + "\n"


def plot(results: dict, methods: list, start: str, path: Path) -> Path:
    """Exact match against steps and training seconds, and gradient norms, for one start."""
    runs = [r for r in results["runs"] if r["phase"] == "final" and r["start"] == start]
    return base.plot({"runs": runs}, methods, path)
