"""Time of `hpd.teachers.align.align_spans` per batch of 8 rows of 512 student tokens.

Cross-tokenizer distillation aligns every row on the CPU before the loss, so this is
the cost added to each step. Offsets are synthetic: one text per row, cut by the
student into tokens of 1 to 6 characters and by the teacher into tokens of 1 to 8, a
special (0, 0) token in front of the teacher's, and one token in ten split in two
pieces that repeat its span (as a byte-level BPE splits a multi-byte character).

    python -m benchmarks.align_cost [--batch 8] [--tokens 512] [--repeats 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hpd.teachers.align import align_spans


def offsets(rng, n_tokens: int, max_len: int, text_len: int | None = None) -> np.ndarray:
    lengths = rng.integers(1, max_len + 1, size=n_tokens)
    ends = np.cumsum(lengths)
    if text_len is not None:  # cover the same text as the other side
        ends = ends[ends < text_len]
        ends = np.append(ends, text_len)
    out = np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1)
    split = rng.random(len(out)) < 0.1  # a split character: two tokens, one span
    return np.repeat(out, np.where(split, 2, 1), axis=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(args.batch):
        student = offsets(rng, args.tokens, 6)[: args.tokens]
        teacher = offsets(rng, 4 * args.tokens, 8, text_len=int(student[-1, 1]))
        rows.append((student, np.concatenate([[[0, 0]], teacher])))
    times, aligned = [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = [align_spans(s, t) for s, t in rows]
        times.append(time.perf_counter() - t0)
    aligned = sum(int((a.student_target_to_teacher_position >= 0).sum()) for a in out)
    print(f"align_spans: {1e3 * np.median(times):.2f} ms per batch of {args.batch} x {args.tokens} "
          f"student tokens (median of {args.repeats}; {aligned} targets aligned)")


if __name__ == "__main__":
    main()
