"""Build the embedded tiny teacher, student, tokenizer and data in hpd/assets/tiny.

    python -m scripts.make_tiny_models [--out DIR] [--models teacher,student] [--teacher-steps N] [--student-steps N]

Everything is made offline and seeded, on CPU with 2 threads (a few minutes), by
scripts.model_maker from the task scripts.model_tasks.TINY:

1. arithmetic word problems from hpd.tasks.arith: train.jsonl and held.jsonl
   (held-out problems never share their arithmetic with training problems);
2. a byte-level BPE tokenizer (digits split one by one) trained on the training text,
   saved as a PreTrainedTokenizerFast with bos/eos/pad/unk and a chat template;
3. a tiny LlamaForCausalLM teacher trained from scratch with AdamW;
4. a smaller student, trained briefly so that it is clearly worse than the teacher;
5. checks: both folders load in transformers and mlx-lm, tokenizer ids agree,
   logits agree; greedy held-out exact match is measured on the saved weights and
   written into each model card and manifest.json.

Sequence format: [bos] + prompt ids + completion ids + [eos], loss on completion + eos.
"""

from scripts.model_maker import main
from scripts.model_tasks import TINY

if __name__ == "__main__":
    main(TINY, description=__doc__)
