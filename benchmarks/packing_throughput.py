"""Target tokens per second of `hpd distill` with and without --packing, on rows of mixed length.

The models are benchmarks.chat_assets' small Qwen2 pair (vocabulary 4096); rows are
prompt/completion pairs of 20 to 1000 tokens (lengths drawn uniformly), batch 8,
max_length 1024. One process builds both runs (hpd.distill's own Loop each, same rows in
the same order) and interleaves their steps, rotating which goes first, so that the
machine's load falls on both alike. Reported: target tokens / second over the timed
steps (sum of target tokens / sum of step times) and the ratio.

    python -m benchmarks.packing_throughput [--iters 12] [--method fkl] [--hpd-args chunked=off]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.chat_assets import build_assets
from benchmarks.chat_vs_trl import hpd_stepper


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="fkl", choices=["fkl", "jsd", "hpd"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hpd-args", nargs="*", default=[], metavar="FIELD=VALUE")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="pack-assets-"))
    steps = args.warmup + args.iters
    # a prompt of 8-40 words and a completion of 10-958: rows of about 20 to 1000 tokens
    build_assets(root, rows=args.batch * steps + 8, prompt=(8, 40), completion=(10, 958))
    runs = {}
    for packing in (False, True):
        cfg = dict(root=str(root), method=args.method, batch=args.batch, warmup=args.warmup, iters=args.iters,
                   max_length=1024, hpd_args=[f"packing={packing}", *args.hpd_args])
        runs[packing] = hpd_stepper(cfg)
    spent = {k: 0.0 for k in runs}
    tokens = {k: 0 for k in runs}
    order = list(runs)
    for i in range(steps):
        for packing in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            record = runs[packing](None)
            if i >= args.warmup:
                spent[packing] += time.perf_counter() - t0
                tokens[packing] += record["tokens"]
    rate = {k: tokens[k] / spent[k] for k in runs}
    print(f"\n{args.method}, batch {args.batch}, rows of 20-1000 tokens, {args.iters} timed steps after "
          f"{args.warmup} warmup, torch threads {args.threads}, load {os.getloadavg()[0]:.1f}"
          + (f", hpd overrides {' '.join(args.hpd_args)}" if args.hpd_args else ""))
    print("| packing | target tokens | seconds | target tokens/s |\n|---|---:|---:|---:|")
    for k in runs:
        print(f"| {'on' if k else 'off'} | {tokens[k]} | {spent[k]:.2f} | {rate[k]:.0f} |")
    print(f"\npacking speed-up: {rate[True] / rate[False]:.2f}x (goal >= 1.5x)")


if __name__ == "__main__":
    main()
