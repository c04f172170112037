"""The command line of a sums benchmark (benchmarks.sums_runner), built from its data: the
options, the plan they make, the run, results.json with its meta, and the tables and figures
again from an earlier results.json (--from-results)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks._common import commit
from benchmarks.sums_runner import Runner, SumsBenchmark


def parser_for(bench: SumsBenchmark) -> argparse.ArgumentParser:
    full, quick = bench.full, bench.quick
    p = argparse.ArgumentParser(description=bench.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a short check (a few minutes on 2 CPU cores): {quick}")
    if bench.teachers:
        p.add_argument("--teacher", default=next(iter(bench.teachers)), choices=list(bench.teachers),
                       help=f"the teacher of every run (default: {next(iter(bench.teachers))})")
    if bench.recipe_option:
        p.add_argument("--recipe", default=bench.recipe, help=f"recipe every run starts from (default: {bench.recipe})")
    if len(bench.starts) > 1:
        notes = "".join(f"; {name} is {start.note}" for name, start in bench.starts.items() if start.note)
        default = [name for name, start in bench.starts.items() if start.by_default]
        p.add_argument("--starts", nargs="+", default=default, choices=list(bench.starts),
                       help=f"students every method starts from (default: {' '.join(default)}){notes}")
    own = "; ".join(f"from {name}: {', '.join(start.methods)}" for name, start in bench.starts.items() if start.methods)
    default = f"each start's own ({own}; from the others all)" if own else "all"
    p.add_argument("--methods", nargs="+", default=None, choices=list(bench.methods), metavar="METHOD",
                   help=f"any of: {', '.join(repr(m) for m in bench.methods)} (default: {default})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"the table's seeds (default: {' '.join(map(str, full['seeds']))}, quick "
                   f"{' '.join(map(str, quick['seeds']))})")
    p.add_argument("--steps", type=int, default=0,
                   help=f"optimizer steps per run (default: {full['steps']}, quick {quick['steps']})")
    for start in full.get("grid", {}):
        p.add_argument(f"--grid-{start}", type=float, nargs="+", default=None, metavar="LR",
                       help=f"learning rates tried per method from the {start} student on the validation split "
                       f"(default: {full['grid'][start]}; quick: {quick['grid'][start]}, nothing chosen)")
    if "grid" in full:
        p.add_argument("--rates-from", metavar="JSON", default="",
                       help="take each method's rate from an earlier run's results.json instead of a grid "
                       "(for a longer check of the chosen rates)")
    for key, help_text in bench.options.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=0,
                       nargs="+" if isinstance(full[key], list) else None,
                       help=f"{help_text} (default: {full[key]}, quick {quick[key]})")
    p.add_argument("--threads", type=int, default=bench.threads, help=f"torch threads (default: {bench.threads})")
    p.add_argument("--out", default=bench.out, help="folder for the runs, the table and the figures")
    p.add_argument("--from-results", metavar="JSON", default="",
                   help="only rewrite the table and the figures from an earlier run's results.json")
    p.add_argument("--add-to", metavar="JSON", default="",
                   help="run --methods into an earlier run's results.json (its plan, its starting students), "
                   "add them to it and rewrite the table and the figures")
    for flag, (help_text, _) in bench.additions.items():
        p.add_argument(flag, action="store_true", help=f"with --from-results: {help_text}")
    return p


def plan_of(bench: SumsBenchmark, args) -> dict:
    """The full or the quick plan with the options given on top."""
    plan = json.loads(json.dumps(bench.quick if args.quick else bench.full))
    for key in ("steps", *bench.options):
        if getattr(args, key):
            plan[key] = getattr(args, key)
    for start in plan.get("grid", {}):
        plan["grid"][start] = getattr(args, f"grid_{start.replace('-', '_')}") or plan["grid"][start]
    plan["seeds"] = args.seeds or plan["seeds"]
    if "grid" in plan:
        plan["rates_from"] = args.rates_from
    plan["eval_every"] = min(plan["eval_every"], plan["steps"])
    return plan


def main(bench: SumsBenchmark, argv=None) -> dict:
    parser = parser_for(bench)
    args = parser.parse_args(argv)
    additions = [fn for flag, (_, fn) in bench.additions.items() if getattr(args, flag[2:].replace("-", "_"))]
    if additions and not args.from_results:
        parser.error(f"{', '.join(bench.additions)} need --from-results")
    if bench.teachers:
        bench = bench.for_teacher(args.teacher)
    if args.from_results:
        if not Path(args.from_results).is_file():
            parser.error(f"--from-results: no file {args.from_results}")
        results = json.loads(Path(args.from_results).read_text())
        for add in additions:
            add(bench, results)
        if additions:
            Path(args.from_results).write_text(json.dumps(results, indent=1) + "\n")
        return bench.write_report(results, list(bench.methods), Path(args.out))
    if args.add_to:
        if not args.methods:
            parser.error("--add-to needs --methods: the methods to add")
        return bench.write_report(add_to(bench, args, argv), list(bench.methods), Path(args.out))
    return bench.write_report(run(bench, args, argv), list(bench.methods), Path(args.out))


def run(bench: SumsBenchmark, args, argv) -> dict:
    """Every run of the plan; writes OUT/results.json and returns what it holds."""
    import torch

    plan = plan_of(bench, args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, at_commit = time.perf_counter(), commit()
    runner = Runner(bench, plan, out, getattr(args, "recipe", bench.recipe))
    starts = getattr(args, "starts", list(bench.starts))
    got = runner.run_all(starts, args.methods, getattr(args, "rates_from", ""))
    meta = {"command": " ".join(["python -m", bench.module, *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": at_commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
            "torch": torch.__version__, **({"trl": trl_version()} if _uses_trl(bench) else {}),
            **({"teacher": args.teacher} if bench.teachers else {}),
            "plan": plan, "params": runner.params, "prompt_tokens": runner.prompt_tokens,
            "total_seconds": time.perf_counter() - started}
    analysis = {}
    if bench.teacher_on_data:
        from benchmarks.sums_analysis import teacher_on_data

        analysis["teacher_on_data"] = teacher_on_data(bench, got["inits"].get("sft-init", {}).get("out", ""))
    results = {"meta": meta, **{k: v for k, v in got.items() if k != "runs"}, **analysis, "runs": got["runs"]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def add_to(bench: SumsBenchmark, args, argv) -> dict:
    """`--methods` run into the results file `--add-to` under its own plan, from its starting
    students (its SFT-initialized ones where it made them); the file is written back with the
    new runs, their chosen rates and a record of the addition in meta["added"]."""
    import torch

    path = Path(args.add_to)
    results = json.loads(path.read_text())
    plan = results["meta"]["plan"]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, at_commit = time.perf_counter(), commit()
    runner = Runner(bench, plan, out, getattr(args, "recipe", bench.recipe))
    for start, init in results.get("inits", {}).items():
        if not Path(init["out"], "config.json").is_file():
            raise SystemExit(f"--add-to: the {start} student {init['out']} is gone; run the benchmark again")
        runner.starts[start] = init["out"]
    for start in [s for s in getattr(args, "starts", results["chosen_lr"]) if s in results["chosen_lr"]]:
        chosen, runs = runner.run_start(start, args.methods)
        results.setdefault("chosen_lr", {}).setdefault(start, {}).update(chosen)
        results["runs"] += runs
    results["meta"].setdefault("added", []).append({
        "command": " ".join(["python -m", bench.module, *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": at_commit,
        "methods": args.methods, "total_seconds": time.perf_counter() - started})
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def _uses_trl(bench: SumsBenchmark) -> bool:
    return any("trl" in spec for spec in bench.methods.values())


def trl_version() -> str:
    try:
        from benchmarks.sums_trl import version

        return version()
    except ImportError:
        return "not installed"
