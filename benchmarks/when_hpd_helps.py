"""Distillation methods on the sums task, at equal optimizer steps, several seeds.

    python benchmarks/when_hpd_helps.py [--quick] [--steps N] [--seeds 0 1 2] [--methods ...] [--out DIR]

Runs sft, fkl, rkl, jsd(0.5) off-policy, jsd(0.5) on-policy (lambda 1, TRL's GKD
setting), hpd, and hpd under the hybrid schedule of recipes/on-policy-mix.yaml, each
through `hpd.distill(...)` from the `sums` recipe (docs/when-hpd-helps.md). Records per
run: held-out exact match (greedy, and sampled at temperature 1 averaged over several
samples), the style of the greedy answers, token-level KL(teacher || student) on the
teacher's own answers and on the data's style, wall time and a FLOP estimate, the loss
and gradient-norm series, and HPD's diagnostics. Writes OUT/results.json (every run),
OUT/results.md (the table) and OUT/curves.png (accuracy against steps and against
seconds, gradient norm against steps).

Runs go seed by seed, each seed through every method, so that a change in the machine's
load during the benchmark falls on all methods alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import when_hpd_helps_report as report  # noqa: E402

import hpd  # noqa: E402
from hpd.train.config import DistillConfig, resolve_recipe  # noqa: E402


def _hybrid_schedule() -> dict:
    import yaml

    return yaml.safe_load(resolve_recipe("on-policy-mix").read_text())["schedule"]


METHODS = {
    "sft": {"method": "sft"},
    "fkl": {"method": "fkl"},
    "rkl": {"method": "rkl"},
    "jsd (off-policy)": {"method": "jsd", "method_params": {"beta": 0.5}},
    "jsd (on-policy)": {"method": "jsd", "method_params": {"beta": 0.5}, "schedule": {"lambda_start": 1.0}},
    "hpd": {"method": "hpd"},
    "hpd (hybrid)": {"method": "hpd", "schedule": _hybrid_schedule()},
}

FULL = dict(steps=200, seeds=[0, 1, 2], eval_every=50, eval_generate=64, final_rows=200, samples=4,
            sample_rows=50)
QUICK = dict(steps=40, seeds=[0], eval_every=20, eval_generate=40, final_rows=60, samples=2, sample_rows=30)


def slug(name: str) -> str:
    return name.replace(" (", "-").replace(")", "").replace(" ", "-")


def run_one(name: str, seed: int, plan: dict, args, out_root: Path) -> dict:
    """One distillation through hpd.distill, then the held-out measurements."""
    import torch

    from hpd.report.evaluate import likelihood
    from hpd.tasks import sums_models as sm

    base = DistillConfig.from_recipe(args.recipe)
    out = out_root / f"{slug(name)}-seed{seed}"
    cfg = DistillConfig.from_dict({**base.to_dict(), **METHODS[name], "seed": seed, "out": str(out),
                                   "overwrite": True, "progress": False, "steps": plan["steps"],
                                   "eval_every": plan["eval_every"], "eval_generate": plan["eval_generate"]})
    started = time.perf_counter()
    result = hpd.distill(cfg)
    seconds = time.perf_counter() - started
    backend, student, tok = result["backend"], result["student"], result["tokenizer"]
    teacher = backend.load_model(cfg.teacher, trainable=False)
    held = sm.load_rows("held")[: plan["final_rows"]]
    prompts, refs = [r["prompt"] for r in held], [r["completion"] for r in held]
    greedy = sm.score(prompts, refs, sm.generate_texts(student, tok, prompts, max_new_tokens=cfg.rollout_max_new_tokens))
    torch.manual_seed(10_000 + seed)
    k, rows = plan["samples"], plan["sample_rows"]
    sampled = sm.score(prompts[:rows], refs[:rows], sm.generate_texts(
        student, tok, prompts[:rows], greedy=False, samples=k, max_new_tokens=cfg.rollout_max_new_tokens), samples=k)
    kl_teacher_text = likelihood(backend, student, tok, str(sm.HELD_TEACHER_PATH), teacher=teacher)["kl_to_teacher"]
    kl_data_text = likelihood(backend, student, tok, str(sm.HELD_PATH), teacher=teacher)["kl_to_teacher"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"method": name, "seed": seed, "greedy": greedy["accuracy"], "sampled": sampled["accuracy"],
            "styles": greedy["styles"], "openings": greedy["openings"], "sampled_styles": sampled["styles"],
            "kl_teacher_text": kl_teacher_text,
            "kl_data_text": kl_data_text, "seconds": seconds, "out": str(out),
            "series": report.series(records), "flops": report.flops(records, args.params, args.prompt_tokens, cfg.batch_size)}


def baselines(args, plan) -> dict:
    """The teacher's and the untrained student's held-out scores, measured like the runs'."""
    from hpd.backends import get_backend
    from hpd.report.evaluate import likelihood
    from hpd.tasks import sums_models as sm

    base = DistillConfig.from_recipe(args.recipe)
    backend = get_backend("torch", base)
    tok = backend.load_tokenizer(base.student)
    teacher = backend.load_model(base.teacher, trainable=False)
    held = sm.load_rows("held")[: plan["final_rows"]]
    prompts, refs = [r["prompt"] for r in held], [r["completion"] for r in held]
    out = {}
    for name, path in (("teacher", base.teacher), ("student before", base.student)):
        model = backend.load_model(path, trainable=False)
        greedy = sm.score(prompts, refs, sm.generate_texts(model, tok, prompts, max_new_tokens=base.rollout_max_new_tokens))
        import torch

        torch.manual_seed(10_000)
        k, rows = plan["samples"], plan["sample_rows"]
        sampled = sm.score(prompts[:rows], refs[:rows], sm.generate_texts(
            model, tok, prompts[:rows], greedy=False, samples=k, max_new_tokens=base.rollout_max_new_tokens),
            samples=k)
        kl = {"kl_teacher_text": 0.0, "kl_data_text": 0.0}
        if name != "teacher":
            kl = {"kl_teacher_text": likelihood(backend, model, tok, str(sm.HELD_TEACHER_PATH), teacher=teacher)["kl_to_teacher"],
                  "kl_data_text": likelihood(backend, model, tok, str(sm.HELD_PATH), teacher=teacher)["kl_to_teacher"]}
        out[name] = {"greedy": greedy["accuracy"], "sampled": sampled["accuracy"], "styles": greedy["styles"],
                     "openings": greedy["openings"], **kl}
        n_params = sum(p.numel() for p in model.parameters())
        args.params["teacher" if name == "teacher" else "student"] = n_params
    args.prompt_tokens = sum(len(tok.encode(p, add_special_tokens=False)) + 1 for p in prompts) / len(prompts)
    return out


def add_openings(results: dict) -> None:
    """Greedy answers of every run's exported student again; fills in `openings` (first-line styles)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd.tasks import sums_models as sm

    held = sm.load_rows("held")[: results["meta"]["plan"]["final_rows"]]
    prompts, refs = [r["prompt"] for r in held], [r["completion"] for r in held]
    max_new_tokens = DistillConfig.from_recipe("sums").rollout_max_new_tokens
    folders = [(b, path) for b, path in ((results["baselines"]["teacher"], sm.TEACHER_DIR),
                                         (results["baselines"]["student before"], sm.STUDENT_DIR))]
    folders += [(r, r["out"]) for r in results["runs"]]
    for entry, folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        got = sm.score(prompts, refs, sm.generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens))
        if abs(got["accuracy"] - entry["greedy"]) > 1e-9:
            print(f"note: {folder}: greedy {got['accuracy']:.3f} now, {entry['greedy']:.3f} recorded")
        entry["openings"] = got["openings"]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a short check (about 5 minutes on 2 CPU cores): {QUICK}")
    parser.add_argument("--recipe", default="sums", help="recipe every run starts from (default: sums)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: 200, quick 40)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2, quick 0)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"methods to run, any of: {', '.join(repr(m) for m in METHODS)} (default: all)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between curve points (default: 50, quick 20)")
    parser.add_argument("--eval-generate", type=int, default=0,
                        help="held-out rows generated greedily at each curve point (default: 64, quick 40)")
    parser.add_argument("--final-rows", type=int, default=0, help="held-out rows for the final greedy accuracy "
                        "(default: 200, quick 60)")
    parser.add_argument("--samples", type=int, default=0, help="samples per prompt for sampled accuracy (default: 4, quick 2)")
    parser.add_argument("--sample-rows", type=int, default=0, help="held-out rows for sampled accuracy (default: 50, quick 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--out", default="runs/when-hpd-helps", help="folder for the runs, the table and the plot")
    parser.add_argument("--from-results", metavar="JSON", default="",
                        help="only rewrite the table and the plot from an earlier run's results.json")
    parser.add_argument("--add-openings", action="store_true",
                        help="with --from-results: first regenerate each run's greedy answers from its exported "
                        "student and record how they open (for results written before openings were recorded)")
    args = parser.parse_args(argv)
    if args.add_openings and not args.from_results:
        parser.error("--add-openings needs --from-results")
    if args.from_results and not Path(args.from_results).is_file():
        parser.error(f"--from-results: no file {args.from_results}")
    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
        if args.add_openings:
            add_openings(results)
            Path(args.from_results).write_text(json.dumps(results, indent=1) + "\n")
        return write_report(results, Path(args.out))
    plan = dict(QUICK if args.quick else FULL)
    for key in ("steps", "eval_every", "eval_generate", "final_rows", "samples", "sample_rows"):
        if getattr(args, key):
            plan[key] = getattr(args, key)
    plan["seeds"] = args.seeds or plan["seeds"]
    plan["eval_every"] = min(plan["eval_every"], plan["steps"])
    import torch

    torch.set_num_threads(args.threads)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    args.params, args.prompt_tokens = {}, 0.0
    started, at_commit = time.perf_counter(), commit()
    base = baselines(args, plan)
    print(f"teacher: greedy {base['teacher']['greedy']:.3f}; student before: greedy "
          f"{base['student before']['greedy']:.3f}", flush=True)
    runs = []
    for seed in plan["seeds"]:
        for name in args.methods:
            r = run_one(name, seed, plan, args, out_root)
            runs.append(r)
            print(f"{name:18s} seed {seed}: greedy {r['greedy']:.3f} sampled {r['sampled']:.3f} "
                  f"KL {r['kl_teacher_text']:.3f} {r['seconds']:.0f} s", flush=True)
    meta = {"command": " ".join(["python benchmarks/when_hpd_helps.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": at_commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
            "plan": plan, "params": args.params, "prompt_tokens": args.prompt_tokens,
            "total_seconds": time.perf_counter() - started}
    results = {"meta": meta, "baselines": base, "runs": runs}
    (out_root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return write_report(results, out_root)


def write_report(results: dict, out_root: Path) -> dict:
    methods = [m for m in METHODS if any(r["method"] == m for r in results["runs"])]
    out_root.mkdir(parents=True, exist_ok=True)
    text = report.markdown(results, methods)
    (out_root / "results.md").write_text(text)
    print("\n" + text)
    try:
        report.plot(results, list(METHODS), out_root / "curves.png")  # a method keeps its colour in every figure
        print(f"wrote {out_root / 'results.md'} and {out_root / 'curves.png'}")
    except ImportError as e:
        print(f"no plot ({e}); wrote {out_root / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
