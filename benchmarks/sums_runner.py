"""One runner for the sums benchmarks: methods compared at equal steps through `hpd.distill`,
configured as data (`SumsBenchmark`) by benchmarks.when_hpd_helps and benchmarks.evidence.

A benchmark names a recipe, the task's splits, its methods, its starts and two plans (the
full run and --quick). Every method of a start begins from the same student: the recipe's,
or that student after SFT on the start's data. A start with a learning-rate grid trains each
method at every rate on a selection seed and keeps the best validation score; methods that
name `lr_from` take another method's rate, and methods with a `trl` entry run TRL's
GKDTrainer (benchmarks.sums_trl) on the same models and token ids. The table's seeds then
run at the chosen rates and read the test split only. Runs go seed by seed (the grid: rate
by rate), each through every method, so that a change in the machine's load falls on all
methods alike.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hpd  # noqa: E402
from benchmarks import sums_report as report  # noqa: E402
from benchmarks._common import read_metrics, slug  # noqa: E402
from hpd.train.config import DistillConfig  # noqa: E402


@dataclass(frozen=True)
class Task:
    """Where the rows come from (`rows(split)`, `path(split)` for the split names below) and how
    the end of a run is scored."""

    rows: Callable[[str], list]
    path: Callable[[str], Path]
    test: str  # scored at the end of every run
    test_rows: str  # the plan's key of how many test prompts are scored
    teacher_text: str  # the teacher's own answers to the test prompts: KL on its text
    val: str = ""  # chooses learning rates ("": the benchmark has no grid)
    kl_rows: str = "scored"  # KL on the "scored" test rows only, or on the "whole" files


@dataclass(frozen=True)
class Start:
    """Where every method of a table starts: the recipe's student trained on `data` (a split;
    "": the recipe's data), first fine-tuned on it with sft when `sft_init`."""

    data: str = ""
    sft_init: bool = False
    note: str = ""  # for --help
    methods: tuple = ()  # the methods run from this start unless --methods names others (empty: all)
    by_default: bool = True  # run when --starts is not given


@dataclass(frozen=True)
class SumsBenchmark:
    """One benchmark as data; `benchmarks.sums_cli.main(benchmark)` runs it."""

    module: str  # python -m <module>
    doc: str
    recipe: str
    task: Task
    methods: dict  # name -> config fields, or {"trl": {...}, "lr_from": name}
    starts: dict  # name -> Start
    full: dict  # the plan: steps, seeds, rows and, with a grid, {"grid": {start: [lr, ...]}}
    quick: dict
    options: dict  # plan keys given as --key-name options -> their help
    baselines: tuple  # the names of the teacher's and the untrained student's rows
    run_folder: str  # a run's folder under --out: format fields slug, start, lr, seed
    write_report: Callable  # benchmarks.sums_report.write_single or write_per_start
    threads: int
    out: str
    curves: str = "recipe"  # curve points on the recipe's eval data ("recipe") or on the first test rows ("test")
    recipe_option: bool = False  # --recipe may name another recipe
    teacher_on_data: bool = False  # record where the teacher disagrees with the data (sums_analysis)
    additions: dict = field(default_factory=dict)  # --flag -> (help, function(benchmark, results)), with --from-results
    teacher: str = ""  # a teacher folder in place of the recipe's
    # --teacher NAME: name -> fields of this benchmark replaced for that teacher (its folder, its
    # own answers' splits); the first is the default
    teachers: dict = field(default_factory=dict)
    # name -> function(runner) run after the starting points; what it returns goes to results[name]
    measures: dict = field(default_factory=dict)

    def base_config(self, recipe: str = "") -> DistillConfig:
        """The recipe's config, with this benchmark's teacher where it names one."""
        return DistillConfig.from_recipe(recipe or self.recipe, {"teacher": self.teacher} if self.teacher else {})

    def for_teacher(self, name: str) -> SumsBenchmark:
        from dataclasses import replace

        if name not in self.teachers:
            raise ValueError(f"unknown teacher {name!r}; known: {', '.join(self.teachers)}")
        return replace(self, **self.teachers[name])


def searched(methods: dict, names: list) -> list:
    """The methods the grid runs: all but those that take another row's rate."""
    return [m for m in names if methods[m].get("lr_from") not in names]


def choose(methods: dict, grid_runs: list, names: list) -> dict:
    """Each method's rate: the best validation greedy exact match; a tie goes to the smaller rate.
    A method with `lr_from` takes that method's rate."""
    chosen = {}
    for m in names:
        rs = sorted((r for r in grid_runs if r["method"] == m), key=lambda r: (-r["val_greedy"], r["lr"]))
        if rs:
            chosen[m] = rs[0]["lr"]
    for m in names:
        if methods[m].get("lr_from") in chosen:
            chosen[m] = chosen[methods[m]["lr_from"]]
    return chosen


class Runner:
    """The models, the plan and the runs of one benchmark."""

    def __init__(self, bench: SumsBenchmark, plan: dict, out: Path, recipe: str):
        from hpd.backends import get_backend

        self.bench, self.task, self.plan, self.out = bench, bench.task, plan, out
        self.base = bench.base_config(recipe)
        self.backend = get_backend("torch", self.base)
        self.tok = self.backend.load_tokenizer(self.base.student)
        self.teacher = self.backend.load_model(self.base.teacher, trainable=False)
        student = self.backend.load_model(self.base.student, trainable=False)
        self.params = {"teacher": sum(p.numel() for p in self.teacher.parameters()),
                       "student": sum(p.numel() for p in student.parameters())}
        prompts, _ = self.rows(self.task.test, plan[bench.task.test_rows])
        self.prompt_tokens = sum(len(self.tok.encode(p, add_special_tokens=False)) + 1 for p in prompts) / len(prompts)
        self.starts = {name: self.base.student for name in bench.starts}
        self.curve_data = None
        if bench.curves == "test":  # curve points read only their own rows (hpd's evaluation takes
            from hpd.tasks import sums  # the KL over all of eval_data)

            self.curve_data = out / "curve.jsonl"
            sums.write_jsonl(self.task.rows(self.task.test)[: plan["curve_rows"]], self.curve_data)

    def rows(self, split: str, n: int) -> tuple[list, list]:
        data = self.task.rows(split)[:n]
        return [r["prompt"] for r in data], [r["completion"] for r in data]

    def greedy(self, model, tok, split: str, n: int) -> dict:
        from hpd.tasks import sums_models as sm

        prompts, refs = self.rows(split, n)
        texts = sm.generate_texts(model, tok, prompts, max_new_tokens=self.base.rollout_max_new_tokens)
        return sm.score(prompts, refs, texts)

    def scores(self, model, tok, seed: int, teacher=None) -> dict:
        """Test exact match (greedy; sampled at T=1, seeded by `seed`), the answers' styles, and
        KL to `teacher` on its own answers and on the data's (0 without a teacher)."""
        import torch

        from hpd.report.evaluate import likelihood
        from hpd.tasks import sums_models as sm

        n = self.plan[self.task.test_rows]
        g = self.greedy(model, tok, self.task.test, n)
        prompts, refs = self.rows(self.task.test, self.plan["sample_rows"])
        torch.manual_seed(10_000 + seed)
        k = self.plan["samples"]
        texts = sm.generate_texts(model, tok, prompts, greedy=False, samples=k,
                                  max_new_tokens=self.base.rollout_max_new_tokens)
        s = sm.score(prompts, refs, texts, samples=k)
        kl = {"kl_teacher_text": 0.0, "kl_data_text": 0.0}
        if teacher is not None:
            limit = n if self.task.kl_rows == "scored" else None
            kl = {name: likelihood(self.backend, model, tok, str(self.task.path(split)), teacher=teacher,
                                   limit=limit)["kl_to_teacher"]
                  for name, split in (("kl_teacher_text", self.task.teacher_text), ("kl_data_text", self.task.test))}
        return {"greedy": g["accuracy"], "sampled": s["accuracy"], "styles": g["styles"], "openings": g["openings"],
                "sampled_styles": s["styles"], **kl}

    def validation(self, model, tok) -> dict:
        return {"val_greedy": self.greedy(model, tok, self.task.val, self.plan["val_rows"])["accuracy"]} \
            if self.task.val else {}

    def baselines(self) -> dict:
        """The teacher's and the untrained student's scores, measured as the runs' are."""
        out = {}
        teacher_name, student_name = self.bench.baselines
        for name, path in ((teacher_name, self.base.teacher), (student_name, self.base.student)):
            model = self.backend.load_model(path, trainable=False)
            out[name] = {**self.scores(model, self.tok, 0, None if name == teacher_name else self.teacher),
                         **self.validation(model, self.tok)}
        return out

    def sft_init(self, start: str) -> dict:
        """The raw student fine-tuned on the start's data: where that start's runs begin."""
        folder = self.out / f"{start}-student"
        cfg = self.config("sft", self.base.student, self.plan["sft_init_lr"], 0, folder, curve=True,
                          steps=self.plan["sft_init_steps"], data=self.data(start))
        started = time.perf_counter()
        student = hpd.distill(cfg)["student"]
        seconds = time.perf_counter() - started
        self.starts[start] = str(folder)
        return {**self.scores(student, self.tok, 0, self.teacher), **self.validation(student, self.tok),
                "steps": self.plan["sft_init_steps"], "lr": self.plan["sft_init_lr"], "seconds": seconds,
                "series": report.series(read_metrics(folder)), "out": str(folder)}

    def config(self, name: str, student: str, lr: float, seed: int, out: Path, *, curve: bool,
               steps: int | None = None, data: str = "") -> DistillConfig:
        fields = {k: v for k, v in self.bench.methods[name].items() if k not in ("trl", "lr_from")}
        return DistillConfig.from_dict({**self.base.to_dict(), **fields, **self.eval_fields(curve), "student": student,
                                        "lr": lr, "seed": seed, "out": str(out), "overwrite": True,
                                        "progress": False, "steps": steps or self.plan["steps"],
                                        **({"data": data} if data else {})})

    def eval_fields(self, curve: bool) -> dict:
        """The curve points hpd's own evaluation takes during a run (none on a grid run)."""
        if not curve:
            return {"eval_data": "", "eval_every": 0, "eval_generate": 0}
        if self.curve_data is None:  # the recipe's eval data
            return {"eval_every": self.plan["eval_every"], "eval_generate": self.plan["eval_generate"]}
        return {"eval_data": str(self.curve_data), "eval_every": self.plan["eval_every"],
                "eval_generate": self.plan["curve_rows"]}

    def data(self, start: str) -> str:
        split = self.bench.starts[start].data
        return str(self.task.path(split)) if split else ""

    def run(self, name: str, start: str, lr: float, seed: int, phase: str) -> dict:
        """One run; phase "grid" scores the validation split, "final" the test split."""
        out = self.out / self.bench.run_folder.format(slug=slug(name), start=start, lr=lr, seed=seed)
        curve = phase != "grid"
        started = time.perf_counter()
        if "trl" in self.bench.methods[name]:
            model, tok, series = self.run_trl(name, start, lr, seed, out, curve)
            flops = None
        else:
            cfg = self.config(name, self.starts[start], lr, seed, out, curve=curve, data=self.data(start))
            result = hpd.distill(cfg)
            model, tok = result["student"], result["tokenizer"]
            records = read_metrics(out)
            series = report.series(records)
            flops = report.flops(records, self.params, self.prompt_tokens, cfg.batch_size)
        seconds = time.perf_counter() - started
        entry = {"method": name, "start": start, "lr": lr, "seed": seed, "phase": phase, "seconds": seconds,
                 "series": series, "flops": flops, "out": str(out), "data": self.bench.starts[start].data or None}
        if phase == "grid":
            entry.update(self.validation(model, tok))
        else:
            entry.update(self.scores(model, tok, seed, self.teacher))
        return entry

    def run_trl(self, name: str, start: str, lr: float, seed: int, out: Path, curve: bool):
        from benchmarks import sums_trl

        spec, base, plan = self.bench.methods[name]["trl"], self.base, self.plan

        def points(model):
            return self.greedy(model, self.tok, self.task.test, plan["curve_rows"])["accuracy"]

        split = self.bench.starts[start].data
        got = sums_trl.run(student=self.starts[start], teacher=base.teacher, rows=self.task.rows(split),
                           out=str(out), steps=plan["steps"], lr=lr, seed=seed, batch_size=base.batch_size,
                           lmbda=spec["lmbda"], beta=spec["beta"], temperature=base.rollout_temperature,
                           max_new_tokens=base.rollout_max_new_tokens, warmup_ratio=base.warmup_ratio,
                           max_grad_norm=base.max_grad_norm, curve=points if curve else None,
                           eval_every=plan["eval_every"])
        return got["model"], got["tokenizer"], sums_trl.series(got, int(spec["lmbda"]))

    def rates(self, start: str, names: list, rates_from: str = "") -> tuple[dict, list]:
        """Each method's learning rate from `start`, and the grid runs that chose it: from an earlier
        results file, from the grid, or the one rate given (the recipe's where there is no grid)."""
        import json

        grid = self.plan.get("grid", {}).get(start, [self.base.lr])
        if rates_from:
            return json.loads(Path(rates_from).read_text())["chosen_lr"][start], []
        if len(grid) == 1:
            return {m: grid[0] for m in names}, []
        runs = []
        for lr in grid:
            for name in searched(self.bench.methods, names):
                runs.append(self.run(name, start, lr, self.plan["selection_seed"], "grid"))
                print(f"[{start}] grid {name:22s} lr {lr:g}: validation greedy {runs[-1]['val_greedy']:.3f} "
                      f"({runs[-1]['seconds']:.0f} s)", flush=True)
        return choose(self.bench.methods, runs, names), runs

    def run_start(self, start: str, names: list | None, rates_from: str = "") -> tuple[dict, list]:
        """One start's rates (grid runs included) and final runs of `names`, or of its own methods."""
        these = names or list(self.bench.starts[start].methods or self.bench.methods)
        chosen, runs = self.rates(start, these, rates_from)
        for seed in self.plan["seeds"]:
            for name in these:
                r = self.run(name, start, chosen[name], seed, "final")
                runs.append(r)
                print(f"[{start}] {name:22s} lr {r['lr']:g} seed {seed}: test greedy {r['greedy']:.3f} sampled "
                      f"{r['sampled']:.3f} KL {r['kl_teacher_text']:.3f} ({r['seconds']:.0f} s)", flush=True)
        return chosen, runs

    def run_all(self, starts: list, names: list | None, rates_from: str = "") -> dict:
        """The baselines, each start's SFT initialization, the benchmark's measures, rates and final
        runs (`names`, or each start's own methods): a results file without its meta."""
        base = self.baselines()
        teacher, student = self.bench.baselines
        print(f"{teacher}: test greedy {base[teacher]['greedy']:.3f}; {student}: {base[student]['greedy']:.3f}",
              flush=True)
        inits = {}
        for start in [s for s in starts if self.bench.starts[s].sft_init]:
            inits[start] = init = self.sft_init(start)
            print(f"{start}: SFT-initialized student ({self.plan['sft_init_steps']} steps, lr "
                  f"{self.plan['sft_init_lr']:g}): test greedy {init['greedy']:.3f}", flush=True)
        measured = {name: measure(self) for name, measure in self.bench.measures.items()}
        runs, chosen = [], {}
        for start in starts:
            chosen[start], got = self.run_start(start, names, rates_from)
            runs += got
        protocol = {"inits": inits, "chosen_lr": chosen} if "grid" in self.plan or inits else {}
        return {"baselines": base, **protocol, **measured, "runs": runs}
