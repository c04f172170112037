"""The tables of the sums benchmarks (benchmarks.sums_runner): a run's series, stability figures
and FLOP estimate, and the one table of methods of when_hpd_helps (`write_single`); the
per-start tables of evidence are benchmarks.sums_evidence_report's. The figures:
benchmarks.sums_plot.

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


def series(records: list) -> dict:
    """Per-step loss, grad norm, cumulative training seconds, rollout steps and the share of their
    rows that are rollouts, and diagnostics;
    eval points (step, seconds, accuracy, held-out KL) from one run's metrics.jsonl records."""
    steps, loss, grad, seconds, on_policy, tokens, rollout_tokens, share = [], [], [], [], [], [], [], []
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
            share.append(r.get("schedule/rollout_share", on_policy[-1]))  # rollout_mix rows: a share of them
            tokens.append(r["tokens"])
            rollout_tokens.append(r.get("rollout/tokens", 0))
            for k in DIAGNOSTICS:
                if k in r:
                    diag[k].append((r["step"], r[k]))
        if "eval/accuracy" in r:
            evals.append({"step": r["step"], "seconds": clock if r["step"] else 0.0,
                          "accuracy": r["eval/accuracy"], "kl": r.get("eval/kl")})
    return {"steps": steps, "loss": loss, "grad_norm": grad, "seconds": seconds, "on_policy": on_policy,
            "tokens": tokens, "rollout_tokens": rollout_tokens, "rollout_share": share, "diagnostics": diag,
            "evals": evals}


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
