"""Does the sums4 teacher continue the students' own answers? Recovery, the premise of
on-policy distillation, measured on the states the students of docs/evidence.md visit.

    python -m benchmarks.sums_recovery [--teachers teacher expert] [--students-teacher teacher]
                                       [--rows 100] [--out runs/recovery] [--write-prefixes]

Students: the SFT-initialized student of benchmarks.evidence (the raw student after 150 steps
of sft on the data, lr 3e-3, seed 0), and from it forward KL (lr 1e-4) and on-policy JSD
(lr 3e-4), the rates chosen for them at 100 steps, checkpointed after 50 and 150 steps;
distilled from `--students-teacher`. Each writes a greedy and a sampled (T=1) answer to the
first `--rows` test prompts; each answer is cut after one random token
(hpd.tasks.sums_recovery.cut), and hand-made mixed-style prefixes of the same prompts join
them. Every teacher of `--teachers` then continues every sound prefix; recovery is the share
that ends on the right answer, beside the teacher's own accuracy on the same prompts. Where
the students' whole answers stop being sound is recorded too (hpd.tasks.sums_recovery.breaks).

--write-prefixes writes the students' prefixes to hpd/assets/sums4/prefixes.jsonl, the file
the expert teacher's card and tests/test_sums_expert.py read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hpd.tasks import sums, sums4  # noqa: E402
from hpd.tasks import sums_recovery as rec  # noqa: E402

# where the students come from: the evidence benchmark's SFT initialization and the rates its
# 100-step grid chose from there (docs/evidence-previous-results.json)
SFT_INIT = {"method": "sft", "steps": 150, "lr": 3e-3}
DISTILLED = {"fkl": {"method": "fkl", "lr": 1e-4},
             "jsd (on-policy)": {"method": "jsd", "method_params": {"beta": 0.5}, "lr": 3e-4,
                                 "schedule": {"lambda_start": 1.0}}}
CHECKPOINTS = (50, 150)
SEED = 0


def train_students(teacher: str, out: Path, *, sft_init: str = "", checkpoints=CHECKPOINTS) -> dict:
    """{name: model folder}: the SFT-initialized student (trained here unless `sft_init` names
    one) and each distilled student at each of `checkpoints` (steps of one run), all distilled
    from `teacher`."""
    import hpd
    from hpd.train.config import DistillConfig

    def config(fields, student, folder, steps):
        return DistillConfig.from_recipe("sums4", {**fields, "teacher": teacher, "student": student, "seed": SEED,
                                                   "steps": steps, "out": str(folder), "overwrite": True,
                                                   "progress": False, "eval_data": "", "eval_every": 0,
                                                   "save_every": checkpoints[0], "keep_checkpoints": 10})

    folders = {}
    if not sft_init:
        sft_init = str(out / "sft-init")
        hpd.distill(config(SFT_INIT, DistillConfig.from_recipe("sums4").student, sft_init, SFT_INIT["steps"]))
    folders["sft-init"] = sft_init
    for name, fields in DISTILLED.items():
        folder = out / name.replace(" ", "-").replace("(", "").replace(")", "")
        hpd.distill(config(fields, sft_init, folder, checkpoints[-1]))
        for step in checkpoints:
            last = step == checkpoints[-1]
            folders[f"{name} {step}"] = str(folder if last else folder / "checkpoints" / f"step-{step}")
    return folders


def for_runner(runner) -> dict:
    """Recovery inside benchmarks.evidence: students distilled from the run's teacher, starting at
    the run's SFT-initialized student (`recovery_steps` and `recovery_rows` of the plan), and every
    shipped teacher's recovery on their prefixes."""
    plan = runner.plan
    init = runner.starts.get("sft-init", runner.base.student)
    sft_init = "" if init == runner.base.student else init  # not run: trained here
    started = time.perf_counter()
    folders = train_students(runner.base.teacher, runner.out / "recovery", sft_init=sft_init,
                             checkpoints=plan["recovery_steps"])
    prefixes, answers = student_prefixes(folders, plan["recovery_rows"])
    got = measure({name: str(folder) for name, folder in sums4.TEACHERS.items()}, prefixes, plan["recovery_rows"])
    print("recovery: " + "; ".join(f"{name} {r['students']['recovery']:.3f} on the students' prefixes, "
                                   f"{r['hand-made']['recovery']:.3f} on hand-made ones" for name, r in got.items()),
          flush=True)
    return {"students_teacher": Path(runner.base.teacher).name, "checkpoints": list(plan["recovery_steps"]),
            "rows": plan["recovery_rows"], "seconds": time.perf_counter() - started, "teachers": got,
            "answers": answers}


def student_prefixes(folders: dict, rows: int, seed: int = SEED) -> tuple[list, dict]:
    """A greedy and a sampled answer of each student to the first `rows` test prompts, each cut
    once (hpd.tasks.sums_recovery.cut): the rows, sound or not, with their sources; and where
    each student's whole answers stop being sound (hpd.tasks.sums_recovery.breaks)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd.tasks.sums_models import decode, generate_ids

    prompts = [r["prompt"] for r in sums4.load_rows("test")[:rows]]
    rng, out, answers = random.Random(seed), [], {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        for how in ("greedy", "sampled"):
            torch.manual_seed(seed)
            gens = generate_ids(model, tok, prompts, greedy=how == "greedy", max_new_tokens=48)
            out += [rec.cut(p, g, tok, rng, f"{name}/{how}") for p, g in zip(prompts, gens)]
            answers[f"{name}/{how}"] = rec.breaks(prompts, [decode(tok, g) for g in gens])
    return out, answers


def measure(teachers: dict, prefixes: list, rows: int) -> dict:
    """{teacher name: own accuracy on the prompts, recovery on hand-made prefixes of them and on
    the students' `prefixes`}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems = [sums.parse_prompt(r["prompt"]) for r in sums4.load_rows("test")[:rows]]
    out = {}
    for name, folder in teachers.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        out[name] = {**rec.measure(model, tok, problems), "students": rec.recovery(model, tok, prefixes)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=["teacher", "expert"], choices=list(sums4.TEACHERS),
                   help="the teachers whose recovery is measured (default: both)")
    p.add_argument("--students-teacher", default="teacher", choices=list(sums4.TEACHERS),
                   help="the teacher the fkl and jsd students are distilled from (default: teacher)")
    p.add_argument("--rows", type=int, default=100, help="test prompts each student answers (default: 100)")
    p.add_argument("--out", default="runs/recovery", help="folder for the students and results.json")
    p.add_argument("--write-prefixes", action="store_true",
                   help="write the students' prefixes to hpd/assets/sums4/prefixes.jsonl")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.perf_counter()
    folders = train_students(str(sums4.TEACHERS[args.students_teacher]), out)
    prefixes, answers = student_prefixes(folders, args.rows)
    if args.write_prefixes:
        sums.write_jsonl([{"prompt": r["prompt"], "prefix": r["prefix"], "source": r["source"]} for r in prefixes],
                         sums4.path("prefixes"))
    got = measure({t: str(sums4.TEACHERS[t]) for t in args.teachers}, prefixes, args.rows)
    results = {"students_teacher": args.students_teacher, "rows": args.rows, "teachers": got, "answers": answers,
               "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for name, r in got.items():
        print(f"{name}: own accuracy {r['own_accuracy']:.3f}; recovery on students' prefixes "
              f"{r['students']['recovery']:.3f} ({r['students']['prefixes']} sound of {r['students']['cut']}), "
              f"hand-made {r['hand-made']['recovery']:.3f} ({r['hand-made']['prefixes']})")
        for source, s in r["students"]["by_source"].items():
            print(f"  {source:28s} {s['recovery']:.3f} ({s['prefixes']} sound of {s['cut']})")
    print("the students' whole answers: " + "; ".join(
        f"{source} sound {a['sound']:.2f}, teacher's opening {a['teacher_opening']:.2f} (wrong on its first line "
        f"{a['wrong_first_line']:.2f}, on the next {a['wrong_second_line']:.2f})" for source, a in answers.items()))
    return results


if __name__ == "__main__":
    main()
