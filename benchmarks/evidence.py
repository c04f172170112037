"""Known results first, then HPD's three claims, on the four-number sums task (docs/evidence.md).

    python -m benchmarks.evidence [--quick] [--teacher expert|teacher] [--out DIR] [--starts ...] [--methods ...]
    python -m benchmarks.evidence --from-results DIR/results.json --out DIR     # table and figures only

The teacher is the shipped expert by default (hpd/assets/sums4/expert: the teacher also
trained to continue mixed-style workings it did not start); --teacher teacher runs the
previous one. Every method of a start begins from the same student: the SFT-initialized one
(the raw student fine-tuned on the data by this benchmark, as published recipes start
distillation), or, in the control, the raw student fine-tuned on the teacher's own answers,
which are then its data (the raw student itself is a third start, not run by default). Each
start runs its own methods unless --methods names others. Each method gets its own learning
rate, the best greedy exact match on the validation split over a grid, trained for the
steps the tables report at a selection seed that the tables do not use; the tables' seeds
then run at that rate and read the test split only. TRL's GKDTrainer trains the same models
on the same token ids, steps, batch, optimizer, learning-rate curve and rate, as three
reference rows: lmbda 0 (off-policy) and lmbda 1 (on-policy) at beta 0.5 as hpd's jsd rows,
and lmbda 0 at beta 0 (TRL's forward KL) beside hpd's fkl row.

Before the runs, recovery (benchmarks.sums_recovery): students distilled from the run's
teacher with fkl and with on-policy jsd, checkpointed along one run, answer test prompts;
their answers cut at random tokens are continued by each shipped teacher.

Per run: test exact match (greedy; sampled at temperature 1, several samples per prompt),
the style and first line of the greedy answers, KL(teacher || student) on the teacher's
own test answers and on the data's style, wall and training seconds, a FLOP estimate, each
step's loss and gradient norm, curve points (exact match on the first test prompts against
steps and training seconds, rollouts included) and HPD's diagnostics. Writes
OUT/results.json (every run, grid runs included), OUT/results.md and one figure per start
(OUT/curves-<start>.png).

Runs go seed by seed (the grid: rate by rate), each through every method, so that a change
in the machine's load falls on all methods alike. The runner is benchmarks.sums_runner;
this module is its configuration.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks import sums_analysis, sums_cli, sums_evidence_report, sums_recovery
from benchmarks.sums_runner import Start, SumsBenchmark, Task
from benchmarks.when_hpd_helps import METHODS as SUMS_METHODS
from hpd.tasks import sums4

# the seven hpd rows of the sums comparison (when_hpd_helps), the hybrid schedule again with
# rollouts mixed into every step's rows instead of replacing whole steps, HPD alone with rollouts
# mixed into its rows, then TRL's reference rows
METHODS = {
    **SUMS_METHODS,
    "hpd (hybrid, rows)": {**SUMS_METHODS["hpd (hybrid)"],
                           "schedule": {**SUMS_METHODS["hpd (hybrid)"]["schedule"], "rollout_mix": "rows"}},
    # HPD alone throughout (no forward-KL phase, whose support is the whole vocabulary), with the
    # hybrid's ramp of rollouts mixed into every step's rows: HPD's support in every step
    "hpd (rows)": {"method": "hpd", "schedule": {"rollout_mix": "rows", "lambda_schedule": "linear",
                                                 "lambda_start": 0.0, "lambda_end": 0.5, "ramp_start": 0.1,
                                                 "ramp_end": 0.6}},
    # TRL's rows take the learning rate chosen for hpd's row of the same objective: one rate for
    # two implementations of one loss, so that a difference between them is not the grid's
    "trl gkd (off-policy)": {"trl": {"lmbda": 0.0, "beta": 0.5}, "lr_from": "jsd (off-policy)"},
    # TRL's beta 0 is KL(teacher || student): hpd's fkl row computed by another implementation
    "trl gkd fkl (off-policy)": {"trl": {"lmbda": 0.0, "beta": 0.0}, "lr_from": "fkl"},
    "trl gkd (on-policy)": {"trl": {"lmbda": 1.0, "beta": 0.5}, "lr_from": "jsd (on-policy)"},
}
# Where every method of a table starts, the data it trains on, and the methods run there unless
# --methods names others. sft-init asks known result (b) and HPD's claims; "teacher-style" is the
# control, the same protocol with the teacher's own answers as the data, and asks known result (a);
# raw (not run by default) is the previous page's third start.
FROM_SFT_INIT = ("sft", "fkl", "jsd (off-policy)", "jsd (on-policy)", "hpd", "hpd (hybrid)", "hpd (hybrid, rows)",
                 "hpd (rows)", "trl gkd (off-policy)", "trl gkd (on-policy)")
STARTS = {"sft-init": Start("train", sft_init=True, methods=FROM_SFT_INIT),
          "teacher-style": Start("train_teacher", sft_init=True, methods=("sft", "fkl", "trl gkd fkl (off-policy)"),
                                 note="the control: SFT-initialized on the teacher's own answers, trained on them"),
          "raw": Start("train", by_default=False)}

# Fine-tuning an SFT-initialized student wants smaller rates than training the raw one: at
# 2e-3 every objective but sft's undid the initialization within 40 steps (docs/evidence.md).
# The rates are chosen at the length the tables report (300 steps).
FULL = dict(steps=300, grid={"sft-init": [3e-5, 1e-4, 3e-4, 1e-3], "raw": [3e-4, 1e-3, 3e-3],
                             "teacher-style": [3e-4, 1e-3, 3e-3]},
            selection_seed=100, seeds=[0, 1, 2], sft_init_steps=150, sft_init_lr=3e-3, eval_every=50, curve_rows=48,
            val_rows=150, test_rows=300, samples=4, sample_rows=100, recovery_rows=100, recovery_steps=[50, 150])
QUICK = dict(steps=20, grid={"sft-init": [3e-4], "raw": [1e-3], "teacher-style": [3e-4]}, selection_seed=100,
             seeds=[0], sft_init_steps=150, sft_init_lr=3e-3, eval_every=10, curve_rows=16, val_rows=40, test_rows=60,
             samples=2, sample_rows=20, recovery_rows=30, recovery_steps=[10, 20])
# the plan's keys that options set (--sft-init-steps ...), with their help
OPTIONS = {"sft_init_steps": "steps of the SFT initialization", "eval_every": "steps between curve points",
           "curve_rows": "test rows generated greedily at each curve point",
           "val_rows": "validation rows that choose the rates", "test_rows": "test rows for the final greedy accuracy",
           "samples": "samples per prompt for sampled accuracy", "sample_rows": "test rows for sampled accuracy",
           "recovery_rows": "test prompts the recovery students answer",
           "recovery_steps": "the recovery students' checkpoints (steps of one run of fkl and of on-policy jsd)"}

# scored on the test split; the validation split chooses the rates
TASK = Task(rows=sums4.load_rows, path=sums4.path, test="test", test_rows="test_rows", teacher_text="test_teacher",
            val="val")
ADD_TEACHER_POSITIONS = ("first measure the teacher's probability of the data token per answer position (for "
                         "results written before it was recorded)", sums_analysis.add_teacher_positions)


def _teacher(name: str) -> dict:
    """The fields of the benchmark for one shipped teacher: its folder, and its own answers as the
    text of the KL to the teacher and as the control's data."""
    control = replace(STARTS["teacher-style"], data=f"train_{name}")
    return {"teacher": str(sums4.TEACHERS[name]), "task": replace(TASK, teacher_text=f"test_{name}"),
            "starts": {**STARTS, "teacher-style": control},
            "baselines": ("teacher" if name == "teacher" else f"teacher ({name})", "raw student")}


BENCHMARK = SumsBenchmark(
    module="benchmarks.evidence", doc=__doc__, recipe="sums4", task=TASK, methods=METHODS, starts=STARTS,
    full=FULL, quick=QUICK, options=OPTIONS, baselines=("teacher", "raw student"),
    run_folder="runs/{start}/{slug}-lr{lr:g}-seed{seed}", write_report=sums_evidence_report.write_per_start,
    threads=1, out="runs/evidence", curves="test", teacher_on_data=True,
    additions={"--add-teacher-positions": ADD_TEACHER_POSITIONS},
    teachers={"expert": _teacher("expert"), "teacher": _teacher("teacher")},
    measures={"recovery": sums_recovery.for_runner},
).for_teacher("expert")


def main(argv=None) -> dict:
    return sums_cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
