"""Build the shipped sums teacher, student, tokenizer and data in hpd/assets/sums.

    python -m scripts.make_sums_models [--out DIR] [--models teacher,student] [--teacher-steps N] [--student-steps N]

The task and why it looks the way it does: docs/when-hpd-helps.md. Everything is made
offline and seeded, on CPU with 2 threads, by scripts.model_maker from the task
scripts.model_tasks.SUMS:

1. problems from hpd.tasks.sums, split so that no held-out list of numbers is trained on;
2. a byte-level BPE tokenizer trained on the task text (the tiny models' recipe);
3. the teacher, trained from scratch on answers written forward (45%), backward (45%) and
   in pairs (10%): it writes two styles and can read the third;
4. the student, a model about 8x smaller, trained briefly on all three styles in equal
   parts on other problems, so that it starts weak;
5. the distillation data train.jsonl (pairs style, the teacher's minor style), held.jsonl
   (the held-out prompts, pairs style) and held_teacher.jsonl (the teacher's own sampled
   answers to them, for token-level KL on the teacher's text);
6. measured on the saved weights and written into each model card and manifest.json:
   greedy and sampled (T=1) held-out exact match, the share of each style among greedy and
   sampled answers, the mean probability of each style's full answer, and the mlx-lm vs
   transformers logits check.
"""

from scripts.model_maker import main
from scripts.model_tasks import SUMS

if __name__ == "__main__":
    main(SUMS, description=__doc__)
