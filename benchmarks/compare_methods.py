"""Compare distillation methods on the embedded tiny task at equal steps.

    python -m benchmarks.compare_methods [--steps N] [--seeds 0 1 2] [--backend torch] [--out runs/compare]

Runs sft, fkl, rkl, jsd (on-policy: lambda 1) and hpd from the `tiny` recipe, for each
seed (`--methods jsd hpd` for a subset), then writes a markdown table (held-out exact match mean and spread, token-level KL
to the teacher, wall time) to OUT/results.md and the curves to OUT/curves.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import hpd
from hpd.train.config import DistillConfig

# name on the command line -> (label in the table and the plot, config overrides)
METHODS = {
    "sft": ("sft", {"method": "sft"}),
    "fkl": ("fkl", {"method": "fkl"}),
    "rkl": ("rkl", {"method": "rkl"}),
    "jsd": ("jsd (on-policy)", {"method": "jsd", "method_params": {"beta": 0.5},
                                "schedule": {"lambda_start": 1.0}}),
    "hpd": ("hpd", {"method": "hpd"}),
}
EVALS_PER_RUN = 5  # held-out points per curve (each generates for the held-out rows)


def run_one(name: str, overrides: dict, seed: int, args, out_root: Path) -> dict:
    from hpd.report.evaluate import accuracy, likelihood

    base = DistillConfig.from_recipe(args.recipe)
    out = out_root / f"{name}-seed{seed}"
    steps = args.steps or base.steps
    cfg = DistillConfig.from_dict({**base.to_dict(), **overrides, "seed": seed, "out": str(out),
                                   "overwrite": True, "backend": args.backend, "progress": False,
                                   "steps": steps, "eval_every": max(1, steps // EVALS_PER_RUN),
                                   "eval_generate": args.eval_rows or base.eval_generate})
    started = time.perf_counter()
    result = hpd.distill(cfg)
    seconds = time.perf_counter() - started
    backend, student, tok = result["backend"], result["student"], result["tokenizer"]
    teacher = backend.load_model(cfg.teacher, trainable=False)
    acc = accuracy(backend, student, tok, cfg.eval_data, limit=args.eval_rows or None, progress=False)
    lik = likelihood(backend, student, tok, cfg.eval_data, teacher=teacher)
    return {"method": name, "seed": seed, "accuracy": acc["accuracy"], "kl": lik["kl_to_teacher"],
            "seconds": seconds, "out": str(out)}


def spread(values: list[float]) -> str:
    """The mean, and the standard deviation when there are several seeds to take it over."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict], baseline: dict) -> str:
    lines = ["| method | held-out exact match | KL to teacher | wall time (s) |", "|---|---|---|---|",
             f"| student before | {baseline['student']:.3f} | {baseline['student_kl']:.3f} | |",
             f"| teacher | {baseline['teacher']:.3f} | 0 | |"]
    for name, (label, _) in METHODS.items():
        mine = [r for r in rows if r["method"] == name]
        if mine:
            lines.append(f"| {label} | {spread([r['accuracy'] for r in mine])} | "
                         f"{spread([r['kl'] for r in mine])} | {spread([r['seconds'] for r in mine])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny", help="recipe to start from (default: the tiny default)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    parser.add_argument("--eval-rows", type=int, default=0, help="held-out rows to generate for (0: all)")
    parser.add_argument("--out", default="runs/compare", help="folder for the runs, the table and the plot")
    args = parser.parse_args()

    from hpd.backends import get_backend
    from hpd.report.evaluate import accuracy, likelihood

    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    base = DistillConfig.from_recipe(args.recipe)
    backend = get_backend(args.backend, base)
    tok = backend.load_tokenizer(base.student)
    teacher = backend.load_model(base.teacher, trainable=False)
    student = backend.load_model(base.student, trainable=False)
    limit = args.eval_rows or None
    baseline = {
        "teacher": accuracy(backend, teacher, tok, base.eval_data, limit=limit, progress=False)["accuracy"],
        "student": accuracy(backend, student, tok, base.eval_data, limit=limit, progress=False)["accuracy"],
        "student_kl": likelihood(backend, student, tok, base.eval_data, teacher=teacher)["kl_to_teacher"],
    }
    rows = []
    for name in args.methods:
        for seed in args.seeds:
            r = run_one(name, METHODS[name][1], seed, args, out_root)
            print(f"{METHODS[name][0]:16s} seed {seed}: accuracy {r['accuracy']:.3f}  KL {r['kl']:.3f}  "
                  f"{r['seconds']:.0f} s", flush=True)
            rows.append(r)
    text = table(rows, baseline)
    steps = args.steps or base.steps
    spread_note = "mean ± standard deviation over seeds" if len(args.seeds) > 1 else "one seed"
    header = (f"Tiny task, {steps} steps per run, seeds {args.seeds}, backend {args.backend}; "
              f"{spread_note}.\n\n")
    (out_root / "results.md").write_text(header + text + "\n")
    print("\n" + header + text)
    from hpd.report.plot import plot_runs

    # KL to the teacher, not the loss: each method's loss value is its own quantity
    first = [r for r in rows if r["seed"] == args.seeds[0]]
    plot_runs([r["out"] for r in first], out_root / "curves.png",
              labels=[f"{METHODS[r['method']][0]}, seed {r['seed']}" for r in first],
              panels=(("kl", "KL(teacher || student), training batch"),
                      ("eval/kl", "KL(teacher || student), held out"), ("eval/accuracy", "held-out exact match")))
    print(f"\nwrote {out_root / 'results.md'} and {out_root / 'curves.png'}")


if __name__ == "__main__":
    main()
