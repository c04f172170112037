"""Distillation methods on the sums task, at equal optimizer steps, several seeds.

    python -m benchmarks.when_hpd_helps [--quick] [--steps N] [--seeds 0 1 2] [--methods ...] [--out DIR]
    python -m benchmarks.when_hpd_helps --from-results DIR/results.json --out DIR     # table and plot only

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
load during the benchmark falls on all methods alike. The runner is benchmarks.sums_runner;
this module is its configuration.
"""

from __future__ import annotations

from benchmarks import sums_analysis, sums_cli, sums_report
from benchmarks.sums_runner import Start, SumsBenchmark, Task
from hpd.tasks import sums_models
from hpd.train.config import resolve_recipe


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
# the plan's keys that options set (--eval-every ...), with their help
OPTIONS = {"eval_every": "steps between curve points",
           "eval_generate": "held-out rows generated greedily at each curve point",
           "final_rows": "held-out rows for the final greedy accuracy",
           "samples": "samples per prompt for sampled accuracy", "sample_rows": "held-out rows for sampled accuracy"}

PATHS = {"train": sums_models.TRAIN_PATH, "held": sums_models.HELD_PATH, "held_teacher": sums_models.HELD_TEACHER_PATH}
# scored on the held-out split, with KL over its whole files; no validation split, no grid: the recipe's rate
TASK = Task(rows=sums_models.load_rows, path=PATHS.__getitem__, test="held", test_rows="final_rows",
            teacher_text="held_teacher", kl_rows="whole")
ADD_OPENINGS = ("first regenerate each run's greedy answers from its exported student and record how they open "
                "(for results written before openings were recorded)", sums_analysis.add_openings)

BENCHMARK = SumsBenchmark(module="benchmarks.when_hpd_helps", doc=__doc__, recipe="sums", task=TASK, methods=METHODS,
                          starts={"raw": Start()}, full=FULL, quick=QUICK, options=OPTIONS,
                          baselines=("teacher", "student before"), run_folder="{slug}-seed{seed}",
                          write_report=sums_report.write_single, threads=2, out="runs/when-hpd-helps",
                          recipe_option=True, additions={"--add-openings": ADD_OPENINGS})


def main(argv=None) -> dict:
    return sums_cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
