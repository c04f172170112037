"""Step time of the mlx backend with and without --compile on, on the tiny recipe.

Both runs are `hpd distill --recipe tiny --backend mlx` (hpd, batch 32, max_length 128,
the shipped tiny teacher and student), built in one process with hpd.distill's own Loop
each; their steps are interleaved (alternating which goes first) so that the machine's
load falls on both alike. Reported: median step time of each, the ratio, and the largest
difference between the two runs' per-step losses (the same rows and the same keyed
samples, so they must agree to float rounding).

The first compiled steps build kernels (on Linux CPU with g++, tens of seconds on a cold
cache); --warmup steps are untimed for both runs.

    python -m benchmarks.mlx_compile [--warmup 6] [--iters 30] [--chunked auto] [--fixed-batch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks._common import capture_loop
from hpd.train.config import DistillConfig


def loop_for(overrides: dict):
    """hpd.distill's own Loop for the tiny recipe on mlx with `overrides`."""
    cfg = DistillConfig.from_recipe("tiny", dict(backend="mlx", out=tempfile.mkdtemp() + "/o", progress=False,
                                                 eval_every=0, eval_data="", eval_generate=0, save_every=0,
                                                 **overrides))
    return capture_loop(cfg)


class _Repeat:
    epoch = 0

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return self.batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--chunked", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--fixed-batch", action="store_true",
                    help="train on the first micro-batch every step: the steady state without recompiles")
    args = ap.parse_args(argv)
    loops = {mode: loop_for(dict(compile=mode, chunked=args.chunked)) for mode in ("off", "on")}
    if args.fixed_batch:  # one micro-batch every step: no new shapes, so no compilation after the first
        for loop in loops.values():
            loop.batches = _Repeat(next(loop.batches))
    times = {k: [] for k in loops}
    losses = {k: [] for k in loops}
    order = list(loops)
    for i in range(args.warmup + args.iters):
        for mode in (order if i % 2 == 0 else order[::-1]):
            loop = loops[mode]
            t0 = time.perf_counter()
            record = loop.train_step(loop.schedule.plan(loop.state.step))
            elapsed = time.perf_counter() - t0
            losses[mode].append(record["loss"])
            if i >= args.warmup:
                times[mode].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max(abs(a - b) for a, b in zip(losses["off"], losses["on"]))
    print(f"tiny recipe on mlx ({os.environ.get('LD_PRELOAD', 'no LD_PRELOAD')}), chunked={args.chunked}, "
          f"{'one fixed micro-batch, ' if args.fixed_batch else ''}"
          f"median of {args.iters} steps after {args.warmup} warmup, load {os.getloadavg()[0]:.1f}")
    print("| --compile | median step ms |\n|---|---:|")
    for k in loops:
        print(f"| {k} | {med[k] * 1000:.1f} |")
    print(f"\ncompiled / uncompiled step time: {med['on'] / med['off']:.2f}x (goal <= 0.8x); "
          f"largest per-step loss difference: {diff:.2e}")


if __name__ == "__main__":
    main()
