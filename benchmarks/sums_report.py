"""The tables of the sums benchmarks (benchmarks.sums_runner): a run's series, stability figures
and FLOP estimate, then either one table of methods (when_hpd_helps: `write_single`) or, per
start, the learning-rate grid, final performance, the known results, agreement with TRL,
efficiency and stability (evidence: `write_per_start`). The figures: benchmarks.sums_plot.

The definitions below are printed under every table.
"""

from __future__ import annotations

import statistics
from pathlib import Path

DIAGNOSTICS = ("hpd/sample_differs", "hpd/neg_w_y", "hpd/active_w_s")
SPIKE_WINDOW, SPIKE_RATIO = 20, 3.0
STYLES = ("forward", "backward", "pairs", "other")

DEFINITIONS = """
- training seconds: per step, the loop's own timing (teacher and student forward, backward,
  optimizer step: tokens / tokens_per_s) plus rollout generation (rollout/seconds); no
  evaluation. Wall time is the whole `hpd.distill` call, periodic evaluations included.
- FLOPs: (6 N_student + 2 N_teacher) per token a step trains on (targets plus prompt), plus
  2 N_student per prompt and generated token of a rollout (KV cache); N counts all parameters
  (the tied head is a real matmul). Attention's quadratic term is left out (sequences < 100).
- gradient-norm spike: a step whose gradient norm (before clipping) exceeds 3x the median of
  the 20 steps of the same kind (offline or rollout) before it. "Between kinds": how many more
  the same rule counts when the kinds are not told apart (an offline step right after a run of
  rollout steps, whose gradients are smaller, then looks like a spike).
- step noise: the coefficient of variation (std / mean) of the gradient norm and of the loss
  over the second half of a run, averaged over seeds. Loss spread across seeds: std over
  seeds of the mean loss over the last 20% of steps.
"""
# printed under the per-start tables too
PER_START_DEFINITIONS = """
- exact match at equal time: each run's last curve point (first test prompts, greedy) whose
  training seconds are at most the mean training seconds of the same start's sft runs;
  the cheapest method's budget, so every method is compared at the time sft needs.
- a known result "holds on every seed" when the difference, paired by seed, is positive for
  each seed; otherwise the mean and spread say how far it is from holding.
"""


def series(records: list) -> dict:
    """Per-step loss, grad norm, cumulative training seconds, rollout steps and diagnostics;
    eval points (step, seconds, accuracy, held-out KL) from one run's metrics.jsonl records."""
    steps, loss, grad, seconds, on_policy, tokens, rollout_tokens = [], [], [], [], [], [], []
    diag = {k: [] for k in DIAGNOSTICS}
    evals = []
    clock = 0.0
    for r in records:
        if "grad_norm" in r and not r.get("skipped"):
            clock += r["tokens"] / max(r["tokens_per_s"], 1e-9) + r.get("rollout/seconds", 0.0)
            steps.append(r["step"])
            loss.append(r["loss"])
            grad.append(r["grad_norm"])
            seconds.append(clock)
            on_policy.append(r.get("schedule/on_policy", 0))
            tokens.append(r["tokens"])
            rollout_tokens.append(r.get("rollout/tokens", 0))
            for k in DIAGNOSTICS:
                if k in r:
                    diag[k].append((r["step"], r[k]))
        if "eval/accuracy" in r:
            evals.append({"step": r["step"], "seconds": clock if r["step"] else 0.0,
                          "accuracy": r["eval/accuracy"], "kl": r.get("eval/kl")})
    return {"steps": steps, "loss": loss, "grad_norm": grad, "seconds": seconds, "on_policy": on_policy,
            "tokens": tokens, "rollout_tokens": rollout_tokens, "diagnostics": diag, "evals": evals}


def flops(records: list, params: dict, prompt_tokens: float, batch_rows: int | None = None) -> float:
    s = series(records)
    n_s, n_t = params["student"], params["teacher"]
    rows = batch_rows or 32
    total = 0.0
    for tok, gen in zip(s["tokens"], s["rollout_tokens"]):
        total += (6 * n_s + 2 * n_t) * (tok + rows * prompt_tokens)
        if gen:
            total += 2 * n_s * (gen + rows * prompt_tokens)
    return total


def spikes(values: list, kinds: list | None = None) -> int:
    """Steps whose value exceeds SPIKE_RATIO x the median of the SPIKE_WINDOW steps before it;
    with `kinds` (offline 0 / rollout 1 per step), only steps of the same kind are compared, so
    that a run mixing two kinds of step with different gradient scales is not counted as spiky."""
    count = 0
    kinds = kinds or [0] * len(values)
    for kind in set(kinds):
        same = [v for v, k in zip(values, kinds) if k == kind]
        for t in range(SPIKE_WINDOW, len(same)):
            if same[t] > SPIKE_RATIO * statistics.median(same[t - SPIKE_WINDOW:t]):
                count += 1
    return count


def _cv(values: list) -> float:
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.stdev(values) / abs(mean) if mean else float("inf")


def stability(runs: list) -> dict:
    half = [r["series"] for r in runs]
    grad_cv = statistics.fmean(_cv(s["grad_norm"][len(s["grad_norm"]) // 2:]) for s in half)
    loss_cv = statistics.fmean(_cv(s["loss"][len(s["loss"]) // 2:]) for s in half)
    tails = [statistics.fmean(s["loss"][-max(1, len(s["loss"]) // 5):]) for s in half]
    return {"grad_cv": grad_cv, "loss_cv": loss_cv,
            "loss_seed_sd": statistics.stdev(tails) if len(tails) > 1 else 0.0,
            "spikes": statistics.fmean(spikes(s["grad_norm"]) for s in half),
            "spikes_same_kind": statistics.fmean(spikes(s["grad_norm"], s["on_policy"]) for s in half),
            "max_grad": max(max(s["grad_norm"]) for s in half)}


def ms(values: list, digits: int = 3) -> str:
    """Mean, and ± the standard deviation where there are several values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def shares(d: dict) -> str:
    """Style shares as "fwd / bwd / pairs / other"."""
    if not d:
        return "-"
    return " / ".join(f"{d.get(k, 0.0):.2f}" for k in STYLES)


def mean_shares(runs: list, key: str) -> dict:
    if not all(key in r for r in runs):
        return {}
    return {k: statistics.fmean(r[key].get(k, 0.0) for r in runs) for k in STYLES}


def definitions(*texts: str) -> list:
    """The definitions printed under a table, one line each."""
    return ["Definitions: " + " ".join(texts[0].split()), *(" ".join(t.split()) for t in texts[1:])]


# ---------------------------------------------------------------------------- shared sections


def stability_table(by: dict, heading: str) -> list:
    lines = ["", f"{heading} Stability", "",
             "| method | grad-norm CV (2nd half) | loss CV (2nd half) | final loss, sd across seeds | "
             "grad-norm spikes per run | more if offline and rollout steps are not told apart | largest grad norm |",
             "|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        s = stability(rs)
        lines.append(f"| {m} | {s['grad_cv']:.3f} | {s['loss_cv']:.3f} | {s['loss_seed_sd']:.4f} | "
                     f"{s['spikes_same_kind']:.1f} | {s['spikes'] - s['spikes_same_kind']:+.1f} | "
                     f"{s['max_grad']:.2f} |")
    return lines


def diagnostics_table(by: dict, heading: str) -> list:
    """HPD's diagnostics, the first tenth of the steps against the last, for methods that log them."""
    rows = []
    for m, rs in by.items():
        vals = {}
        for k in DIAGNOSTICS:
            per = [r["series"]["diagnostics"].get(k, []) for r in rs]
            if not all(per):
                continue
            first = [v for p in per for _, v in p[: max(1, len(p) // 10)]]
            last = [v for p in per for _, v in p[-max(1, len(p) // 10):]]
            vals[k] = f"{statistics.fmean(first):.3f} → {statistics.fmean(last):.3f}"
        if vals:
            rows.append(f"| {m} | " + " | ".join(vals.get(k, "-") for k in DIAGNOSTICS) + " |")
    if not rows:
        return []
    return ["", f"{heading} HPD diagnostics (first 10% of steps → last 10%, mean over seeds)", "",
            "| method | share of samples s != y | share of negative w_y | share of active w_s |",
            "|---|---|---|---|", *rows]


# ---------------------------------------------------------------------------- one table of methods


def markdown(results: dict, methods: list) -> str:
    """The table of when_hpd_helps: every method from the recipe's student, beside the baselines."""
    meta, base, runs = results["meta"], results["baselines"], results["runs"]
    plan = meta["plan"]
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    by = {m: rs for m, rs in by.items() if rs}
    sft_flops = statistics.fmean(r["flops"] for r in by["sft"]) if "sft" in by else None
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; commit {meta['commit']}; {meta['machine']}; "
        f"total {meta['total_seconds'] / 60:.1f} min.  ",
        f"{plan['steps']} optimizer steps per run, seeds {plan['seeds']}; mean ± standard deviation over seeds. "
        f"Greedy exact match on {plan['final_rows']} held-out prompts; sampled: temperature 1, "
        f"{plan['samples']} samples on each of {plan['sample_rows']} prompts.",
        "",
        "### Final performance",
        "",
        "| method | greedy exact match | sampled exact match (T=1) | KL to teacher, teacher's text | "
        "KL to teacher, data's text | greedy answers in full style fwd / bwd / pairs / other | "
        "greedy first line fwd / bwd / pairs / other |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in base.items():
        lines.append(f"| {name} | {b['greedy']:.3f} | {b['sampled']:.3f} | {b['kl_teacher_text']:.3f} | "
                     f"{b['kl_data_text']:.3f} | {shares(b['styles'])} | {shares(b.get('openings', {}))} |")
    for m, rs in by.items():
        lines.append(f"| {m} | {ms([r['greedy'] for r in rs])} | {ms([r['sampled'] for r in rs])} | "
                     f"{ms([r['kl_teacher_text'] for r in rs])} | {ms([r['kl_data_text'] for r in rs])} | "
                     f"{shares(mean_shares(rs, 'styles'))} | {shares(mean_shares(rs, 'openings'))} |")
    lines += ["", "### Efficiency", "",
              "| method | wall time (s) | training time (s) | rollout steps | FLOPs (1e12) | FLOPs / sft's |",
              "|---|---|---|---|---|---|"]
    for m, rs in by.items():
        f = [r["flops"] / 1e12 for r in rs]
        rel = f"{statistics.fmean(r['flops'] for r in rs) / sft_flops:.2f}" if sft_flops else "-"
        train = [r["series"]["seconds"][-1] for r in rs]
        lines.append(f"| {m} | {ms([r['seconds'] for r in rs], 0)} | {ms(train, 0)} | "
                     f"{statistics.fmean(sum(r['series']['on_policy']) for r in rs):.0f} | {ms(f, 2)} | {rel} |")
    lines += stability_table(by, "###") + diagnostics_table(by, "###")
    lines += ["", *definitions(DEFINITIONS)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- per start

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
    return lines


def markdown_per_start(results: dict, methods: list) -> str:
    """The tables of evidence: the starting points, then per start the grid, the final test
    scores, the known results, hpd against TRL, efficiency, stability and HPD's diagnostics."""
    lines = _starting_points(results)
    for start in results["chosen_lr"]:
        by = finals(results, start, methods)
        lines += ["", f"## Start: {TITLES.get(start, start)}", "", *_grid_table(results, start, methods),
                  *_final_table(by), "", "#### Known results, paired by seed", "", *known_results(by), "",
                  "#### hpd's rows against TRL's GKDTrainer, paired by seed", "", *agreement(by)]
        lines += _efficiency_table(by) + stability_table(by, "####") + diagnostics_table(by, "####")
    lines += ["", *definitions(DEFINITIONS, PER_START_DEFINITIONS)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- files


def write_single(results: dict, methods: list, out: Path) -> dict:
    """OUT/results.md and OUT/curves.png; a method keeps its colour (its place in `methods`)
    in every figure."""
    from benchmarks.sums_plot import plot

    ran = [m for m in methods if any(r["method"] == m for r in results["runs"])]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, ran)
    (out / "results.md").write_text(text)
    print("\n" + text)
    try:
        plot(results, methods, out / "curves.png")
        print(f"wrote {out / 'results.md'} and {out / 'curves.png'}")
    except ImportError as e:
        print(f"no plot ({e}); wrote {out / 'results.md'}")
    return results


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
