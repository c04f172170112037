"""Known results first, then HPD's three claims, on the four-number sums task (docs/evidence.md).

    python benchmarks/evidence.py [--quick] [--out DIR] [--starts sft-init raw] [--methods ...] [--seeds ...]
    python benchmarks/evidence.py --from-results DIR/results.json --out DIR     # table and figures only

Every method starts from the same student: in the first table the SFT-initialized one (the
raw student fine-tuned on the data by this script, as published recipes start
distillation), in the second the raw student itself, in the third (the control) the raw
student fine-tuned on the teacher's own answers, which are then its data. Each method gets its own learning
rate, the best greedy exact match on the validation split over a grid, trained at a
selection seed that the table does not use; the table's seeds then run at that rate and
read the test split only. TRL's GKDTrainer trains the same models on the same token ids,
steps, batch, optimizer, learning-rate curve and rate, as three reference rows: lmbda 0
(off-policy) and lmbda 1 (on-policy) at beta 0.5 as hpd's jsd rows, and lmbda 0 at beta 0
(TRL's forward KL) beside hpd's fkl row.

Per run: test exact match (greedy; sampled at temperature 1, several samples per prompt),
the style and first line of the greedy answers, KL(teacher || student) on the teacher's
own test answers and on the data's style, wall and training seconds, a FLOP estimate, each
step's loss and gradient norm, curve points (exact match on the first test prompts against
steps and training seconds) and HPD's diagnostics. Writes OUT/results.json (every run,
grid runs included), OUT/results.md and one figure per start (OUT/curves-<start>.png).

Runs go seed by seed (the grid: rate by rate), each through every method, so that a change
in the machine's load falls on all methods alike.
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

import evidence_report as report  # noqa: E402
import when_hpd_helps  # noqa: E402

import hpd  # noqa: E402
from hpd.train.config import DistillConfig  # noqa: E402

RECIPE = "sums4"


# the seven hpd rows of the sums comparison (when_hpd_helps.py), then TRL's reference rows
METHODS = {
    **when_hpd_helps.METHODS,
    # TRL's rows take the learning rate chosen for hpd's row of the same objective: one rate for
    # two implementations of one loss, so that a difference between them is not the grid's
    "trl gkd (off-policy)": {"trl": {"lmbda": 0.0, "beta": 0.5}, "lr_from": "jsd (off-policy)"},
    # TRL's beta 0 is KL(teacher || student): hpd's fkl row computed by another implementation
    "trl gkd fkl (off-policy)": {"trl": {"lmbda": 0.0, "beta": 0.0}, "lr_from": "fkl"},
    "trl gkd (on-policy)": {"trl": {"lmbda": 1.0, "beta": 0.5}, "lr_from": "jsd (on-policy)"},
}
# Where every method of a table starts, and the data it trains on. "teacher-style" is the control:
# the same protocol with the teacher's own answers as the data.
STARTS = {"sft-init": "train", "raw": "train", "teacher-style": "train_teacher"}
DEFAULT_STARTS = ("sft-init", "raw", "teacher-style")
INITIALIZED = ("sft-init", "teacher-style")  # starts that are the raw student after SFT on their data

# Fine-tuning an SFT-initialized student wants smaller rates than training the raw one: at
# 2e-3 every objective but sft's undid the initialization within 40 steps (docs/evidence.md).
FULL = dict(steps=100, grid={"sft-init": [1e-4, 3e-4, 1e-3], "raw": [3e-4, 1e-3, 3e-3],
                             "teacher-style": [3e-4, 1e-3, 3e-3]},
            selection_seed=100, seeds=[0, 1, 2], sft_init_steps=150, sft_init_lr=3e-3, eval_every=25, curve_rows=48,
            val_rows=150, test_rows=300, samples=4, sample_rows=100)
QUICK = dict(steps=20, grid={"sft-init": [3e-4], "raw": [1e-3], "teacher-style": [3e-4]}, selection_seed=100,
             seeds=[0], sft_init_steps=150, sft_init_lr=3e-3, eval_every=10, curve_rows=16, val_rows=40, test_rows=60,
             samples=2, sample_rows=20)


def slug(name: str) -> str:
    return name.replace(" (", "-").replace(")", "").replace(" ", "-")


def rows(split: str, n: int) -> tuple[list, list]:
    from hpd.tasks import sums4

    data = sums4.load_rows(split)[:n]
    return [r["prompt"] for r in data], [r["completion"] for r in data]


def greedy(model, tok, split: str, n: int) -> dict:
    from hpd.tasks import sums_models as sm

    prompts, refs = rows(split, n)
    max_new = DistillConfig.from_recipe(RECIPE).rollout_max_new_tokens
    return sm.score(prompts, refs, sm.generate_texts(model, tok, prompts, max_new_tokens=max_new))


def test_scores(model, tok, plan: dict, seed: int, backend, teacher) -> dict:
    """Test exact match (greedy and sampled), styles, and KL to the teacher on both texts."""
    import torch

    from hpd.report.evaluate import likelihood
    from hpd.tasks import sums4
    from hpd.tasks import sums_models as sm

    g = greedy(model, tok, "test", plan["test_rows"])
    prompts, refs = rows("test", plan["sample_rows"])
    torch.manual_seed(10_000 + seed)
    k = plan["samples"]
    max_new = DistillConfig.from_recipe(RECIPE).rollout_max_new_tokens
    s = sm.score(prompts, refs, sm.generate_texts(model, tok, prompts, greedy=False, samples=k,
                                                  max_new_tokens=max_new), samples=k)
    kl = {}
    if teacher is not None:
        kl = {"kl_teacher_text": likelihood(backend, model, tok, str(sums4.path("test_teacher")), teacher=teacher,
                                            limit=plan["test_rows"])["kl_to_teacher"],
              "kl_data_text": likelihood(backend, model, tok, str(sums4.path("test")), teacher=teacher,
                                         limit=plan["test_rows"])["kl_to_teacher"]}
    else:
        kl = {"kl_teacher_text": 0.0, "kl_data_text": 0.0}
    return {"greedy": g["accuracy"], "sampled": s["accuracy"], "styles": g["styles"], "openings": g["openings"],
            "sampled_styles": s["styles"], **kl}


class Bench:
    """The models, the plan and the runs of one benchmark."""

    def __init__(self, plan: dict, out: Path, threads: int):
        from hpd.backends import get_backend

        self.plan, self.out, self.threads = plan, out, threads
        self.base = DistillConfig.from_recipe(RECIPE)
        self.backend = get_backend("torch", self.base)
        self.tok = self.backend.load_tokenizer(self.base.student)
        self.teacher = self.backend.load_model(self.base.teacher, trainable=False)
        self.params = {"teacher": sum(p.numel() for p in self.teacher.parameters())}
        prompts, _ = rows("test", plan["test_rows"])
        self.prompt_tokens = sum(len(self.tok.encode(p, add_special_tokens=False)) + 1 for p in prompts) / len(prompts)
        self.starts = {"raw": self.base.student}
        # curve points read only their own rows (hpd's evaluation also takes the KL over all of eval_data)
        from hpd.tasks import sums, sums4

        self.curve_data = out / "curve.jsonl"
        sums.write_jsonl(sums4.load_rows("test")[: plan["curve_rows"]], self.curve_data)

    def baselines(self) -> dict:
        out = {}
        for name, path in (("teacher", self.base.teacher), ("raw student", self.base.student)):
            model = self.backend.load_model(path, trainable=False)
            out[name] = {**test_scores(model, self.tok, self.plan, 0, self.backend,
                                       None if name == "teacher" else self.teacher),
                         "val_greedy": greedy(model, self.tok, "val", self.plan["val_rows"])["accuracy"]}
            if name == "raw student":
                self.params["student"] = sum(p.numel() for p in model.parameters())
        return out

    def sft_init(self, start: str) -> dict:
        """The raw student fine-tuned on the start's data: where that start's runs begin."""
        folder = self.out / f"{start}-student"
        cfg = self.config("sft", self.base.student, self.plan["sft_init_lr"], 0, folder, curve=True,
                          steps=self.plan["sft_init_steps"], data=self.data(start))
        started = time.perf_counter()
        result = hpd.distill(cfg)
        seconds = time.perf_counter() - started
        self.starts[start] = str(folder)
        student = result["student"]
        return {**test_scores(student, self.tok, self.plan, 0, self.backend, self.teacher),
                "val_greedy": greedy(student, self.tok, "val", self.plan["val_rows"])["accuracy"],
                "steps": self.plan["sft_init_steps"], "lr": self.plan["sft_init_lr"], "seconds": seconds,
                "series": report.series(_records(folder)), "out": str(folder)}

    def config(self, name: str, student: str, lr: float, seed: int, out: Path, *, curve: bool,
               steps: int | None = None, data: str = "") -> DistillConfig:
        fields = {k: v for k, v in METHODS[name].items() if k not in ("trl", "lr_from")}
        eval_fields = ({"eval_data": str(self.curve_data),
                        "eval_every": self.plan["eval_every"], "eval_generate": self.plan["curve_rows"]}
                       if curve else {"eval_data": "", "eval_every": 0, "eval_generate": 0})
        return DistillConfig.from_dict({**self.base.to_dict(), **fields, **eval_fields, "student": student,
                                        "lr": lr, "seed": seed, "out": str(out), "overwrite": True,
                                        "progress": False, "steps": steps or self.plan["steps"],
                                        **({"data": data} if data else {})})

    @staticmethod
    def data(start: str) -> str:
        from hpd.tasks import sums4

        return str(sums4.path(STARTS[start]))

    def run(self, name: str, start: str, lr: float, seed: int, phase: str) -> dict:
        """One run; phase "grid" scores the validation split, "final" the test split."""
        data = self.data(start)
        out = self.out / "runs" / start / f"{slug(name)}-lr{lr:g}-seed{seed}"
        curve = phase != "grid"
        started = time.perf_counter()
        if "trl" in METHODS[name]:
            model, tok, series = self.run_trl(name, start, lr, seed, out, curve)
            on_policy = METHODS[name]["trl"]["lmbda"]
            flops = None
        else:
            cfg = self.config(name, self.starts[start], lr, seed, out, curve=curve, data=data)
            result = hpd.distill(cfg)
            model, tok = result["student"], result["tokenizer"]
            records = _records(out)
            series = report.series(records)
            on_policy = None
            flops = report.flops(records, self.params, self.prompt_tokens, cfg.batch_size)
        seconds = time.perf_counter() - started
        entry = {"method": name, "start": start, "lr": lr, "seed": seed, "phase": phase, "seconds": seconds,
                 "series": series, "flops": flops, "out": str(out), "data": STARTS[start]}
        if on_policy is not None:
            entry["series"]["on_policy"] = [int(on_policy)] * len(series["steps"])
        if phase == "grid":
            entry["val_greedy"] = greedy(model, tok, "val", self.plan["val_rows"])["accuracy"]
        else:
            entry.update(test_scores(model, tok, self.plan, seed, self.backend, self.teacher))
        return entry

    def run_trl(self, name, start, lr, seed, out, curve):
        import evidence_trl

        from hpd.tasks import sums4

        spec, base, plan = METHODS[name]["trl"], self.base, self.plan

        def points(model):
            return greedy(model, self.tok, "test", plan["curve_rows"])["accuracy"]

        got = evidence_trl.run(student=self.starts[start], teacher=base.teacher, rows=sums4.load_rows(STARTS[start]),
                               out=str(out), steps=plan["steps"], lr=lr, seed=seed, batch_size=base.batch_size,
                               lmbda=spec["lmbda"], beta=spec["beta"], temperature=base.rollout_temperature,
                               max_new_tokens=base.rollout_max_new_tokens, warmup_ratio=base.warmup_ratio,
                               max_grad_norm=base.max_grad_norm, curve=points if curve else None,
                               eval_every=plan["eval_every"])
        recs = got["records"]
        series = {"steps": [r["step"] for r in recs], "loss": [r.get("loss", float("nan")) for r in recs],
                  "grad_norm": [r.get("grad_norm", float("nan")) for r in recs],
                  "seconds": [r["seconds"] for r in recs], "on_policy": [0] * len(recs), "tokens": [],
                  "rollout_tokens": [], "diagnostics": {}, "evals": got["evals"]}
        return got["model"], got["tokenizer"], series


def teacher_on_data(student: str = "", n: int = 100) -> dict:
    """The teacher's mean probability of the data token at each position of the pairs-style test
    answers (position 0 is the answer's first token): where the data and the teacher disagree.
    With a `student` folder, also each position's share of the summed forward KL, reverse KL and
    JSD(0.5) between teacher and student there: how much of each objective that disagreement is."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpd.data.examples import encode_row
    from hpd.tasks import sums4

    base = DistillConfig.from_recipe(RECIPE)
    teacher = AutoModelForCausalLM.from_pretrained(base.teacher, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval() if student else None
    tok = AutoTokenizer.from_pretrained(base.teacher)
    totals, counts, tokens = {}, {}, {}
    for row in sums4.load_rows("test")[:n]:
        ex = encode_row(row, tok)
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].float(), dim=-1)
            values = {"p_data_token": lp.gather(-1, ids[0, 1:, None])[:, 0].exp()}
            if other is not None:
                lq = torch.log_softmax(other(input_ids=ids).logits[0, :-1].float(), dim=-1)
                lm = torch.logaddexp(lp, lq) - math.log(2.0)
                values["fkl"] = (lp.exp() * (lp - lq)).sum(-1)
                values["rkl"] = (lq.exp() * (lq - lp)).sum(-1)
                values["jsd"] = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
        for i in range(ex.prompt_len - 1, len(ex.input_ids) - 1):
            k = i - ex.prompt_len + 1
            for name, v in values.items():
                totals.setdefault(name, {})[k] = totals.get(name, {}).get(k, 0.0) + float(v[i])
            counts[k] = counts.get(k, 0) + 1
            tokens.setdefault(k, tok.convert_ids_to_tokens(ex.input_ids[i + 1]))
    out = {"rows": n, "mean_p_data_token": {k: v / counts[k] for k, v in sorted(totals["p_data_token"].items())},
           "tokens_of_first_row": tokens}
    if other is not None:
        out["student"] = student
        out["share_by_position"] = {name: {k: v / sum(totals[name].values()) for k, v in sorted(totals[name].items())}
                                    for name in ("fkl", "rkl", "jsd")}
    return out


def _records(folder: Path) -> list:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def choose(grid_runs: list, methods: list) -> dict:
    """Each method's rate: the best validation greedy exact match; a tie goes to the smaller rate.
    A method with `lr_from` takes that method's rate."""
    chosen = {}
    for m in methods:
        rs = sorted((r for r in grid_runs if r["method"] == m), key=lambda r: (-r["val_greedy"], r["lr"]))
        if rs:
            chosen[m] = rs[0]["lr"]
    for m in methods:
        if METHODS[m].get("lr_from") in chosen:
            chosen[m] = chosen[METHODS[m]["lr_from"]]
    return chosen


def searched(methods: list) -> list:
    """The methods the grid runs: all but those that take another row's rate."""
    return [m for m in methods if METHODS[m].get("lr_from") not in methods]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def trl_version() -> str:
    try:
        import evidence_trl

        return evidence_trl.version()
    except ImportError:
        return "not installed"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a short check (under 5 minutes on 2 CPU cores): {QUICK}")
    parser.add_argument("--starts", nargs="+", default=list(DEFAULT_STARTS), choices=list(STARTS),
                        help="students every method starts from (default: all three); teacher-style is the "
                        "control: SFT-initialized on the teacher's own answers (train_teacher.jsonl), trained on them")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"any of: {', '.join(repr(m) for m in METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="the table's seeds (default: 0 1 2, quick 0)")
    parser.add_argument("--steps", type=int, default=0, help=f"optimizer steps per run (default: {FULL['steps']}, "
                        f"quick {QUICK['steps']})")
    for start in STARTS:
        parser.add_argument(f"--grid-{start}", type=float, nargs="+", default=None, metavar="LR",
                            help=f"learning rates tried per method from the {start} student on the validation split "
                            f"(default: {FULL['grid'][start]}; quick: {QUICK['grid'][start]}, nothing chosen)")
    parser.add_argument("--rates-from", metavar="JSON", default="",
                        help="take each method's rate from an earlier run's results.json instead of a grid "
                        "(for a longer check of the chosen rates)")
    parser.add_argument("--sft-init-steps", type=int, default=0, help="steps of the SFT initialization (default: 150)")
    for key in ("eval_every", "curve_rows", "val_rows", "test_rows", "samples", "sample_rows"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=0, help=f"default: {FULL[key]}, "
                            f"quick {QUICK[key]}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1: on 2 shared cores, faster than 2 for these models)")
    parser.add_argument("--out", default="runs/evidence", help="folder for the runs, the table and the figures")
    parser.add_argument("--from-results", metavar="JSON", default="",
                        help="only rewrite the table and the figures from an earlier run's results.json")
    parser.add_argument("--add-teacher-positions", action="store_true",
                        help="with --from-results: first measure the teacher's probability of the data token per "
                        "answer position (for results written before it was recorded)")
    args = parser.parse_args(argv)
    if args.from_results:
        if not Path(args.from_results).is_file():
            parser.error(f"--from-results: no file {args.from_results}")
        results = json.loads(Path(args.from_results).read_text())
        if args.add_teacher_positions:
            init = report.inits_of(results).get("sft-init", {})
            results["teacher_on_data"] = teacher_on_data(init.get("out", ""))
            Path(args.from_results).write_text(json.dumps(results, indent=1) + "\n")
        return write_report(results, Path(args.out))
    plan = json.loads(json.dumps(QUICK if args.quick else FULL))
    for key in ("steps", "sft_init_steps", "eval_every", "curve_rows", "val_rows", "test_rows", "samples",
                "sample_rows"):
        if getattr(args, key):
            plan[key] = getattr(args, key)
    for start in STARTS:
        plan["grid"][start] = getattr(args, f"grid_{start.replace('-', '_')}") or plan["grid"][start]
    plan["seeds"] = args.seeds or plan["seeds"]
    plan["rates_from"] = args.rates_from
    plan["eval_every"] = min(plan["eval_every"], plan["steps"])
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, at_commit = time.perf_counter(), commit()
    bench = Bench(plan, out, args.threads)
    base = bench.baselines()
    print(f"teacher: test greedy {base['teacher']['greedy']:.3f}; raw student {base['raw student']['greedy']:.3f}",
          flush=True)
    inits = {}
    for start in [s for s in args.starts if s in INITIALIZED]:
        inits[start] = init = bench.sft_init(start)
        print(f"{start}: SFT-initialized student ({plan['sft_init_steps']} steps on {STARTS[start]}.jsonl, lr "
              f"{plan['sft_init_lr']:g}): test greedy {init['greedy']:.3f} (teacher {base['teacher']['greedy']:.3f}), "
              f"validation {init['val_greedy']:.3f}", flush=True)
    runs, chosen = [], {}
    for start in args.starts:
        grid, grid_runs = plan["grid"][start], []
        if args.rates_from:
            chosen[start] = json.loads(Path(args.rates_from).read_text())["chosen_lr"][start]
        elif len(grid) > 1:
            for lr in grid:
                for name in searched(args.methods):
                    r = bench.run(name, start, lr, plan["selection_seed"], "grid")
                    grid_runs.append(r)
                    print(f"[{start}] grid {name:22s} lr {lr:g}: validation greedy {r['val_greedy']:.3f} "
                          f"({r['seconds']:.0f} s)", flush=True)
            chosen[start] = choose(grid_runs, args.methods)
        else:
            chosen[start] = {m: grid[0] for m in args.methods}
        runs += grid_runs
        for seed in plan["seeds"]:
            for name in args.methods:
                r = bench.run(name, start, chosen[start][name], seed, "final")
                runs.append(r)
                print(f"[{start}] {name:22s} lr {r['lr']:g} seed {seed}: test greedy {r['greedy']:.3f} sampled "
                      f"{r['sampled']:.3f} KL {r['kl_teacher_text']:.3f} ({r['seconds']:.0f} s)", flush=True)
    meta = {"command": " ".join(["python benchmarks/evidence.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": at_commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
            "torch": torch.__version__, "trl": trl_version(), "plan": plan, "params": bench.params,
            "prompt_tokens": bench.prompt_tokens, "total_seconds": time.perf_counter() - started}
    results = {"meta": meta, "baselines": base, "inits": inits, "chosen_lr": chosen,
               "teacher_on_data": teacher_on_data(inits["sft-init"]["out"] if "sft-init" in inits else ""),
               "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return write_report(results, out)


def write_report(results: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    text = report.markdown(results, list(METHODS))
    (out / "results.md").write_text(text)
    print("\n" + text)
    try:
        for start in results["chosen_lr"]:
            report.plot(results, list(METHODS), start, out / f"curves-{start}.png")
        print(f"wrote {out / 'results.md'} and the figures")
    except ImportError as e:
        print(f"no figures ({e}); wrote {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
