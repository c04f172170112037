"""Step time of a cross-tokenizer teacher against a teacher of the student's own tokenizer.

On the tiny tokenizer pair of tests/tokenizer_pair.py (a byte-level student, a
SentencePiece-style teacher that splits digits and falls back to bytes), with random
tiny Llama models built here: a student, and two teachers of one shape, one over each
tokenizer. Four ways to run the same training step (teacher forward, student forward
and backward on the chunked path, optimizer step) on the same batches of the pair's
corpus, timed interleaved (one step of each in turn, `--repeats` rounds) and reported
as medians and ratios to `same`:

    same          the teacher over the student's tokenizer, read as today;
    cross-1tok    that teacher through the whole cross-tokenizer path (alignment by
                  text forced): the machinery's own cost;
    cross         the teacher over the other tokenizer (its sequences are longer:
                  digits and rare characters cost it more tokens);
    cross+uld     as cross, with --uld-weight 0.1 (a second objective pass, two sorts
                  of (chunk, V) per chunk).

The pairing (both tokenizations with offsets and align_spans) runs once per example
before training; its time is reported per batch.

    python -m benchmarks.cross_tokenizer [--repeats 30] [--batch 8] [--lines 4] [--method hpd] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpd.backends import get_backend  # noqa: E402
from hpd.data.batches import collate, load_dataset  # noqa: E402
from hpd.teachers.cross import cross_source, prepare  # noqa: E402
from hpd.train.loop import live_teacher, objective_loss_fn  # noqa: E402
from hpd.train.schedule_config import objective_of  # noqa: E402
from tests.tokenizer_pair import corpus, make_pair  # noqa: E402


def build_model(folder: Path, tokenizer, hidden: int, layers: int, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, tie_word_embeddings=False,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6, help="distinct batches cycled through")
    ap.add_argument("--lines", type=int, default=4, help="corpus lines joined into one row")
    ap.add_argument("--method", default="hpd")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="hpd-cross-bench-"))
    s_tok, t_tok = make_pair(root / "tok")
    student_dir = build_model(root / "student", s_tok, hidden=64, layers=2, seed=0)
    same_dir = build_model(root / "teacher_same", s_tok, hidden=128, layers=4, seed=1)
    cross_dir = build_model(root / "teacher_cross", t_tok, hidden=128, layers=4, seed=1)
    data = root / "train.jsonl"
    lines = corpus(args.batch * args.batches * args.lines, seed=1)
    rows = [" ".join(lines[i:i + args.lines]) for i in range(0, len(lines), args.lines)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))

    be = get_backend("torch", SimpleNamespace(device="cpu"))
    student = be.load_model(str(student_dir), trainable=True, dtype="float32")
    optimizer = be.make_optimizer(student, SimpleNamespace(lr=1e-4, weight_decay=0.0, adam_beta1=0.9,
                                                           adam_beta2=0.999, adam_eps=1e-8))
    examples = load_dataset(data, s_tok, 512).examples
    batches = [collate(examples[i:i + args.batch], s_tok.pad_token_id) for i in range(0, len(examples), args.batch)]

    started = time.perf_counter()
    paired = prepare([(data, {})], s_tok, t_tok, 512)
    pairing_s = (time.perf_counter() - started) / len(batches)
    forced = prepare([(data, {})], s_tok, s_tok, 512, same=False)
    teachers = {name: be.load_model(str(d), trainable=False, dtype="float32")
                for name, d in (("same", same_dir), ("cross", cross_dir))}
    runs = {  # name: (teacher, hook, objectives)
        "same": (teachers["same"], live_teacher, [objective_of(args.method, 1.0, {})]),
        "cross-1tok": (teachers["same"], cross_source(forced), [objective_of(args.method, 1.0, {})]),
        "cross": (teachers["cross"], cross_source(paired), [objective_of(args.method, 1.0, {})]),
        "cross+uld": (teachers["cross"], cross_source(paired),
                      [objective_of(args.method, 1.0, {}), objective_of("uld", 0.1, {})]),
    }
    vocab = be.vocab_size(student)
    plan = SimpleNamespace(on_policy=False)

    def step(name: str, batch: dict) -> float:
        teacher, hook, objectives = runs[name]
        loop = SimpleNamespace(backend=be, teacher=teacher, vocab=vocab, chunked=True)
        t0 = time.perf_counter()
        arrays = be.to_arrays(batch)
        source = hook(loop, batch, arrays, plan)
        uniforms = np.random.default_rng(0).random(batch["targets"].shape)
        fn = objective_loss_fn(objectives, source, arrays["targets"], sampled=None, uniforms=uniforms,
                               num_tokens=float((batch["targets"] != -100).sum()), temperature=1.0,
                               chunk_size="auto")
        be.forward_backward(student, arrays, fn, hidden=True)
        be.optimizer_step(student, optimizer, 1e-4, 1.0)
        return time.perf_counter() - t0

    times = {name: [] for name in runs}
    for name in runs:  # warm-up
        step(name, batches[0])
    for r in range(args.repeats):
        batch = batches[r % len(batches)]
        for name in runs:
            times[name].append(step(name, batch))
    med = {name: statistics.median(t) for name, t in times.items()}
    teacher_tokens = np.mean([len(p.teacher_ids) for p in paired.examples.values()])
    student_tokens = np.mean([len(e.input_ids) for e in examples])
    print(f"tiny pair: student {len(s_tok)} tokens (64 x 2 layers), teachers 128 x 4 layers; "
          f"batch {args.batch} rows of {student_tokens:.0f} student / {teacher_tokens:.0f} teacher tokens; "
          f"{args.method}, chunked, {args.threads} thread(s), median of {args.repeats} interleaved steps")
    print(f"pairing: {paired.describe()}; {1e3 * pairing_s:.1f} ms per batch, once before training")
    for name, m in med.items():
        print(f"  {name:<11} {1e3 * m:7.1f} ms/step   {m / med['same']:.2f}x same")


if __name__ == "__main__":
    main()
