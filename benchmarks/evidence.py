"""Known results first, then HPD's three claims, on the four-number sums task (docs/evidence.md).

    python -m benchmarks.evidence [--quick] [--out DIR] [--starts sft-init raw] [--methods ...] [--seeds ...]
    python -m benchmarks.evidence --from-results DIR/results.json --out DIR     # table and figures only

Every method starts from the same student: in the first table the SFT-initialized one (the
raw student fine-tuned on the data by this benchmark, as published recipes start
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
in the machine's load falls on all methods alike. The runner is benchmarks.sums_runner;
this module is its configuration.
"""

from __future__ import annotations

from benchmarks import sums_analysis, sums_cli, sums_report
from benchmarks.sums_runner import Start, SumsBenchmark, Task
from benchmarks.when_hpd_helps import METHODS as SUMS_METHODS
from hpd.tasks import sums4

# the seven hpd rows of the sums comparison (when_hpd_helps), then TRL's reference rows
METHODS = {
    **SUMS_METHODS,
    # TRL's rows take the learning rate chosen for hpd's row of the same objective: one rate for
    # two implementations of one loss, so that a difference between them is not the grid's
    "trl gkd (off-policy)": {"trl": {"lmbda": 0.0, "beta": 0.5}, "lr_from": "jsd (off-policy)"},
    # TRL's beta 0 is KL(teacher || student): hpd's fkl row computed by another implementation
    "trl gkd fkl (off-policy)": {"trl": {"lmbda": 0.0, "beta": 0.0}, "lr_from": "fkl"},
    "trl gkd (on-policy)": {"trl": {"lmbda": 1.0, "beta": 0.5}, "lr_from": "jsd (on-policy)"},
}
# Where every method of a table starts, and the data it trains on. "teacher-style" is the control:
# the same protocol with the teacher's own answers as the data.
STARTS = {"sft-init": Start("train", sft_init=True), "raw": Start("train"),
          "teacher-style": Start("train_teacher", sft_init=True,
                                 note="the control: SFT-initialized on the teacher's own answers "
                                      "(train_teacher.jsonl), trained on them")}

# Fine-tuning an SFT-initialized student wants smaller rates than training the raw one: at
# 2e-3 every objective but sft's undid the initialization within 40 steps (docs/evidence.md).
FULL = dict(steps=100, grid={"sft-init": [1e-4, 3e-4, 1e-3], "raw": [3e-4, 1e-3, 3e-3],
                             "teacher-style": [3e-4, 1e-3, 3e-3]},
            selection_seed=100, seeds=[0, 1, 2], sft_init_steps=150, sft_init_lr=3e-3, eval_every=25, curve_rows=48,
            val_rows=150, test_rows=300, samples=4, sample_rows=100)
QUICK = dict(steps=20, grid={"sft-init": [3e-4], "raw": [1e-3], "teacher-style": [3e-4]}, selection_seed=100,
             seeds=[0], sft_init_steps=150, sft_init_lr=3e-3, eval_every=10, curve_rows=16, val_rows=40, test_rows=60,
             samples=2, sample_rows=20)
# the plan's keys that options set (--sft-init-steps ...), with their help
OPTIONS = {"sft_init_steps": "steps of the SFT initialization", "eval_every": "steps between curve points",
           "curve_rows": "test rows generated greedily at each curve point",
           "val_rows": "validation rows that choose the rates", "test_rows": "test rows for the final greedy accuracy",
           "samples": "samples per prompt for sampled accuracy", "sample_rows": "test rows for sampled accuracy"}

# scored on the test split; the validation split chooses the rates
TASK = Task(rows=sums4.load_rows, path=sums4.path, test="test", test_rows="test_rows", teacher_text="test_teacher",
            val="val")
ADD_TEACHER_POSITIONS = ("first measure the teacher's probability of the data token per answer position (for "
                         "results written before it was recorded)", sums_analysis.add_teacher_positions)

BENCHMARK = SumsBenchmark(
    module="benchmarks.evidence", doc=__doc__, recipe="sums4", task=TASK, methods=METHODS, starts=STARTS,
    full=FULL, quick=QUICK, options=OPTIONS, baselines=("teacher", "raw student"),
    run_folder="runs/{start}/{slug}-lr{lr:g}-seed{seed}", write_report=sums_report.write_per_start, threads=1,
    out="runs/evidence", curves="test", teacher_on_data=True,
    additions={"--add-teacher-positions": ADD_TEACHER_POSITIONS},
)


def main(argv=None) -> dict:
    return sums_cli.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
