"""Series, stability figures, FLOP estimate, the markdown table and the plot of when_hpd_helps.py.

Definitions (also printed under the table):
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

from __future__ import annotations

import statistics
from pathlib import Path

DIAGNOSTICS = ("hpd/sample_differs", "hpd/neg_w_y", "hpd/active_w_s")
SPIKE_WINDOW, SPIKE_RATIO = 20, 3.0


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
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _styles(d: dict) -> str:
    if not d:
        return "-"
    return " / ".join(f"{d.get(k, 0.0):.2f}" for k in ("forward", "backward", "pairs", "other"))


def _mean_shares(runs: list, key: str) -> dict:
    if not all(key in r for r in runs):
        return {}
    return {k: statistics.fmean(r[key].get(k, 0.0) for r in runs) for k in ("forward", "backward", "pairs", "other")}


def markdown(results: dict, methods: list) -> str:
    meta, base, runs = results["meta"], results["baselines"], results["runs"]
    plan = meta["plan"]
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    by = {m: rs for m, rs in by.items() if rs}
    sft_flops = statistics.fmean(r["flops"] for r in by["sft"]) if "sft" in by else None
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; commit {meta['commit']}; {meta['machine']}; total {meta['total_seconds'] / 60:.1f} min.  ",
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
                     f"{b['kl_data_text']:.3f} | {_styles(b['styles'])} | {_styles(b.get('openings', {}))} |")
    for m, rs in by.items():
        lines.append(f"| {m} | {ms([r['greedy'] for r in rs])} | {ms([r['sampled'] for r in rs])} | "
                     f"{ms([r['kl_teacher_text'] for r in rs])} | {ms([r['kl_data_text'] for r in rs])} | "
                     f"{_styles(_mean_shares(rs, 'styles'))} | {_styles(_mean_shares(rs, 'openings'))} |")
    lines += ["", "### Efficiency", "",
              "| method | wall time (s) | training time (s) | rollout steps | FLOPs (1e12) | FLOPs / sft's |",
              "|---|---|---|---|---|---|"]
    for m, rs in by.items():
        f = [r["flops"] / 1e12 for r in rs]
        rel = f"{statistics.fmean(r['flops'] for r in rs) / sft_flops:.2f}" if sft_flops else "-"
        lines.append(f"| {m} | {ms([r['seconds'] for r in rs], 0)} | {ms([r['series']['seconds'][-1] for r in rs], 0)} | "
                     f"{statistics.fmean(sum(r['series']['on_policy']) for r in rs):.0f} | {ms(f, 2)} | {rel} |")
    lines += ["", "### Stability", "",
              "| method | grad-norm CV (2nd half) | loss CV (2nd half) | final loss, sd across seeds | "
              "grad-norm spikes per run | more if offline and rollout steps are not told apart | largest grad norm |",
              "|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        s = stability(rs)
        lines.append(f"| {m} | {s['grad_cv']:.3f} | {s['loss_cv']:.3f} | {s['loss_seed_sd']:.4f} | "
                     f"{s['spikes_same_kind']:.1f} | {s['spikes'] - s['spikes_same_kind']:+.1f} | {s['max_grad']:.2f} |")
    diag_rows = []
    for m, rs in by.items():
        vals = {}
        for k in DIAGNOSTICS:
            pts = [v for r in rs for _, v in r["series"]["diagnostics"][k]]
            if not pts:
                continue
            firsts = [v for r in rs for _, v in r["series"]["diagnostics"][k][: max(1, len(r["series"]["diagnostics"][k]) // 10)]]
            lasts = [v for r in rs for _, v in r["series"]["diagnostics"][k][-max(1, len(r["series"]["diagnostics"][k]) // 10):]]
            vals[k] = f"{statistics.fmean(firsts):.3f} → {statistics.fmean(lasts):.3f}"
        if vals:
            diag_rows.append(f"| {m} | " + " | ".join(vals.get(k, "-") for k in DIAGNOSTICS) + " |")
    if diag_rows:
        lines += ["", "### HPD diagnostics (first 10% of steps → last 10%, mean over seeds)", "",
                  "| method | share of samples s != y | share of negative w_y | share of active w_s |",
                  "|---|---|---|---|", *diag_rows]
    lines += ["", "Definitions: " + " ".join(__doc__.split("Definitions (also printed under the table):")[1].split())]
    return "\n".join(lines) + "\n"


def plot(results: dict, methods: list, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, m in enumerate(methods):
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        kw = dict(color=colors[i % 10], linestyle=styles[i % len(styles)], marker=markers[i % len(markers)],
                  markersize=5, linewidth=1.8, label=m)
        n = min(len(r["series"]["evals"]) for r in rs)
        steps = [rs[0]["series"]["evals"][j]["step"] for j in range(n)]
        acc = [[r["series"]["evals"][j]["accuracy"] for r in rs] for j in range(n)]
        secs = [statistics.fmean(r["series"]["evals"][j]["seconds"] for r in rs) for j in range(n)]
        mean = [statistics.fmean(a) for a in acc]
        lo, hi = [min(a) for a in acc], [max(a) for a in acc]
        # points at the same step would hide each other: each method is nudged sideways a little
        dodge = (i - (len(methods) - 1) / 2) * 0.006 * max(steps[-1], 1)
        for ax, xs in ((axes[0], [x + dodge for x in steps]), (axes[1], secs)):
            ax.plot(xs, mean, **kw)
            if len(rs) > 1:
                ax.fill_between(xs, lo, hi, color=colors[i % 10], alpha=0.12, linewidth=0)
        # gradient norm: mean over seeds, smoothed over 10 steps
        length = min(len(r["series"]["grad_norm"]) for r in rs)
        g = [statistics.fmean(r["series"]["grad_norm"][t] for r in rs) for t in range(length)]
        smooth = [statistics.fmean(g[max(0, t - 9):t + 1]) for t in range(length)]
        axes[2].plot(rs[0]["series"]["steps"][:length], smooth, color=colors[i % 10],
                     linestyle=styles[i % len(styles)], linewidth=1.6, label=m)
    axes[0].set(title="held-out greedy exact match vs steps\n(mean over seeds, band min-max; methods nudged apart on x)",
                xlabel="optimizer step", ylabel="exact match")
    axes[1].set(title="held-out greedy exact match vs training seconds\n(same points; x: mean over seeds)",
                xlabel="training seconds (forward, backward, rollouts)", ylabel="exact match")
    axes[2].set(title="gradient norm before clipping\n(mean over seeds, 10-step moving average)",
                xlabel="optimizer step", ylabel="gradient norm", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
