"""One student, two teachers of different skills: each row scored by the teacher of its task.

The shipped `sums4` teacher writes four-number sums and the `sums` teacher six-number ones;
each is exact on its own task and scores 0 on the other's (it has never seen it). One
student (the shipped sums4 student, ~110K parameters) is distilled on the two tasks' rows
mixed, written by the teachers themselves (sequence-level data: the sums4 teacher's own
answers, and the sums teacher's greedy answers to the sums prompts), in four ways:

- both: `--teacher four=... --teacher six=...`, each row scored by its task's teacher;
- four only / six only: one teacher scores every row, its own task's and the other's;
- sft: the same rows, no teacher.

Reported per run: held-out exact match on each task, and the KL to each teacher on that
teacher's held-out answers (its own text: the rows it would write; `hpd eval --teacher
NAME=...`), over seeds.

    python -m benchmarks.multi_teacher                  # 300 steps x 2 seeds, about 20 minutes here
    python -m benchmarks.multi_teacher --quick          # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = {"four": "hpd:sums4/teacher", "six": "hpd:sums/teacher"}
STUDENT = "hpd:sums4/student"
RUNS = ("both", "four only", "six only", "sft")


def prepare_data(work: Path, rows: int, held: int) -> dict[str, Path]:
    """train.jsonl (both tasks' rows, alternating, each naming its teacher) and each task's
    held-out rows; the six-number answers are the sums teacher's greedy generations."""
    from hpd.backends import get_backend
    from hpd.models.loading import asset_path
    from hpd.train.rollout import Sampling, generate_file

    work.mkdir(parents=True, exist_ok=True)
    six_prompts, six_answers = work / "six_prompts.jsonl", work / "six_teacher.jsonl"
    prompts = Path(asset_path("hpd:sums/train.jsonl")).read_text().splitlines()[:rows]
    six_prompts.write_text("".join(json.dumps({"prompt": json.loads(p)["prompt"]}) + "\n" for p in prompts))
    be = get_backend("torch")
    teacher = be.load_model(asset_path(TEACHERS["six"]), trainable=False, dtype="float32")
    tok = be.load_tokenizer(asset_path(TEACHERS["six"]))
    generate_file(be, teacher, tok, six_prompts, six_answers, sampling=Sampling(max_new_tokens=96), batch_size=64,
                  greedy=True, progress=False)  # resumes: a second call writes nothing
    four = [json.loads(line) for line in Path(asset_path("hpd:sums4/train_teacher.jsonl")).read_text().splitlines()]
    six = [json.loads(line) for line in six_answers.read_text().splitlines()]
    mixed = [row for pair in zip(four[:rows], six[:rows]) for row in pair]
    out = {"train": work / "train.jsonl"}
    out["train"].write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"],
                                                "teacher": "four" if i % 2 == 0 else "six"}) + "\n"
                                    for i, r in enumerate(mixed)))
    answers = {"four": "hpd:sums4/test_teacher.jsonl", "six": "hpd:sums/held_teacher.jsonl"}
    for name, source in (("four", "hpd:sums4/test.jsonl"), ("six", "hpd:sums/held.jsonl")):
        out[name] = _tagged(asset_path(source), work / f"held_{name}.jsonl", name, held)  # prompts for exact match
        _tagged(asset_path(answers[name]), work / f"answers_{name}.jsonl", name, held)
    out["held"] = work / "answers.jsonl"  # each teacher's own answers, for the KL to it
    out["held"].write_text((work / "answers_four.jsonl").read_text() + (work / "answers_six.jsonl").read_text())
    return out


def _tagged(source, out: Path, name: str, n: int) -> Path:
    lines = Path(source).read_text().splitlines()[:n]
    out.write_text("".join(json.dumps({**json.loads(line), "teacher": name}) + "\n" for line in lines))
    return out


def config(run: str, data: dict, out: Path, args, seed: int) -> dict:
    from hpd.models.loading import asset_path

    cfg = dict(student=STUDENT, data=str(data["train"]), out=str(out), method=args.method, steps=args.steps,
               batch_size=32, max_length=128, lr=args.lr, lr_schedule="cosine", warmup_ratio=0.05, seed=seed,
               progress=False, overwrite=True)
    if run == "both":
        cfg["teachers"] = {k: asset_path(v) for k, v in TEACHERS.items()}
    else:  # one teacher for every row (sft reads the data only; its teacher gives the logged KL)
        cfg["teacher"] = asset_path(TEACHERS["six" if run == "six only" else "four"])
    if run == "sft":
        cfg["method"] = "sft"
    return cfg


def score(folder: Path, data: dict, held: int) -> dict[str, float]:
    """Exact match on each task's held-out prompts and KL to each teacher on its own answers."""
    from hpd.backends import get_backend
    from hpd.data.routing import Route
    from hpd.models.loading import asset_path
    from hpd.report.evaluate import accuracy, likelihood

    be = get_backend("torch")
    model = be.load_model(str(folder), trainable=False, dtype="float32")
    tok = be.load_tokenizer(str(folder))
    out = {}
    for name in TEACHERS:
        out[f"accuracy/{name}"] = accuracy(be, model, tok, str(data[name]), limit=held, max_new_tokens=96,
                                           batch_size=64, progress=False)["accuracy"]
    teachers = {n: be.load_model(asset_path(p), trainable=False, dtype="float32") for n, p in TEACHERS.items()}
    route = Route("teacher", tuple(sorted(TEACHERS)))
    kl = likelihood(be, model, tok, str(data["held"]), teachers=teachers, route=route, max_length=128)
    out.update({f"kl/{n}": kl[f"kl_to_teacher/{n}"] for n in TEACHERS})
    return out


def table(results: dict) -> str:
    keys = [f"accuracy/{n}" for n in TEACHERS] + [f"kl/{n}" for n in TEACHERS]
    heads = ["four-number exact match", "six-number exact match", "KL to four (its answers)",
             "KL to six (its answers)"]
    lines = ["| student | " + " | ".join(heads) + " |", "|---|" + "---|" * len(keys)]
    for run in RUNS:
        cells = []
        for key in keys:
            values = [r[key] for r in results[run]]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500, help="training rows per task")
    parser.add_argument("--held", type=int, default=200, help="held-out rows per task")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--method", default="fkl", help="distillation objective of the teacher runs")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multi-teacher")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hpd-multi-teacher"))
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 seed, 200 rows, 40 held out")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.held, args.steps, args.seeds = 200, 40, 20, [0]
    import hpd

    started = time.perf_counter()
    data = prepare_data(args.work, args.rows, args.held)
    results = {run: [] for run in RUNS}
    for seed in args.seeds:
        for run in RUNS:
            folder = args.work / "runs" / f"{run.replace(' ', '-')}-{seed}"
            hpd.distill(config(run, data, folder, args, seed))
            results[run].append({"seed": seed, **score(folder, data, args.held)})
            print(f"seed {seed} {run}: {results[run][-1]}", file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"rows_per_task": args.rows, "held_per_task": args.held, "steps": args.steps, "seeds": args.seeds,
            "method": args.method, "lr": args.lr, "minutes": round(minutes, 1), "student": STUDENT,
            "teachers": TEACHERS}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")
    text = (f"{args.steps} steps of batch 32, {args.method} (sft: none), {len(args.seeds)} seed(s), "
            f"{args.rows} rows per task, {args.held} held out per task; {minutes:.1f} min\n\n{table(results)}\n")
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
