"""Build the shipped four-number sums teacher, student, expert teacher and data in hpd/assets/sums4.

    python -m scripts.make_sums4_models [--out DIR] [--models teacher,student,expert] [--teacher-steps N]
                                        [--student-steps N] [--expert-steps N]
                                        [--student-arch HIDDEN,MLP,LAYERS,HEADS]

The task and why it looks the way it does: hpd/tasks/sums4.py and docs/evidence.md.
Offline and seeded, on CPU with 2 threads, by scripts.model_maker from the task
scripts.model_tasks.SUMS4:

1. problems from hpd.tasks.sums4: a training pool, validation and test sets that share no
   list of numbers;
2. the tokenizer of the sums assets (the same characters; nothing to retrain);
3. the teacher, trained from scratch on answers written forward (45%), backward (45%) and
   in pairs (10%): it writes two styles and reads the third;
4. the raw student, about a third of the teacher's size, trained briefly on other problems
   in all three styles, so that it starts weak but knows the shapes;
5. train.jsonl (the distillation data: pairs style), train_teacher.jsonl (the teacher's own
   sampled answers to the same prompts, a control), val.jsonl, test.jsonl and
   test_teacher.jsonl (the teacher's sampled answers to the test prompts, for KL on its text);
6. the expert: the teacher's shape, trained from scratch on the teacher's answers and on as
   many random mixed-style workings cut at a random token, with loss on a correct
   continuation only (hpd.tasks.sums_recovery.continuation_rows); and its own answers
   (train_expert.jsonl, test_expert.jsonl), as the teacher's;
7. greedy and sampled test exact match, the styles of the answers and the probability of
   each style's full answer, measured on the saved weights and written into the model
   cards and manifest.json; for the expert also its recovery and the teacher's, measured
   alike, on hand-made prefixes and on the students' prefixes in prefixes.jsonl.

prefixes.jsonl comes from students distilled from the teacher, so after rebuilding the
teacher, write it again before the expert:

    python -m scripts.make_sums4_models --models teacher,student
    python -m benchmarks.sums_recovery --teachers teacher --write-prefixes
    python -m scripts.make_sums4_models --models expert
"""

from scripts.model_maker import main
from scripts.model_tasks import SUMS4

if __name__ == "__main__":
    main(SUMS4, description=__doc__)
