"""What the benchmarks share: the commit, run names, resident memory, a run's metrics, the
loop `hpd distill` builds, and the harness that runs each configuration in a fresh process.

A benchmark that measures in child processes parses its arguments with `parse_args(parser,
argv, run_child)` and starts each child with `launch("benchmarks.NAME", cfg)`: the child is
`python -m benchmarks.NAME --child JSON`, run from the repository root, and answers with one
line `RESULT <json>` on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit of the checkout, or "unknown" outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slug(name: str) -> str:
    """A method's name as a folder name: "jsd (on-policy)" -> "jsd-on-policy"."""
    return name.replace(" (", "-").replace(")", "").replace(" ", "-")


# ---------------------------------------------------------------------------- memory


def status_bytes(field: str = "VmRSS") -> int:
    """A size field of /proc/self/status (VmRSS: resident now, VmHWM: its peak) in bytes; 0 where
    there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_mib() -> float:
    """This process's resident set size now, in MiB (nan where there is no /proc)."""
    value = status_bytes("VmRSS")
    return value / 2**20 if value else float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss: KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------- runs


def read_metrics(folder) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    text = (Path(folder) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def capture_loop(config, **hooks):
    """The `hpd.train.loop.Loop` that `hpd.distill(config, **hooks)` builds, taken when it would
    start running: models, optimizer, batches and schedule exactly as `hpd distill` sets them
    up, so that a benchmark can time its `train_step`s beside something else. `hpd.distill` is
    left by an exception before its first step (and its export)."""
    import hpd
    from hpd.train.loop import Loop

    captured = []

    class Captured(Exception):
        pass

    def capture(self, progress=None):
        captured.append(self)
        raise Captured

    original, Loop.run = Loop.run, capture
    try:
        hpd.distill(config, **hooks)
    except Captured:
        pass
    finally:
        Loop.run = original
    return captured[0]


# ---------------------------------------------------------------------------- child processes


def child_env(threads: int = 0, **extra: str) -> dict:
    """The environment of a child: this one, with `threads` OpenMP/MKL threads when given, no
    tokenizer threads, TRL's experimental warning off, and `extra` on top."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def launch(module: str, cfg: dict, *, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `python -m module --child JSON(cfg)` from the repository root and return its result
    with `child_wall_s`, or `cfg` with an "error" (the exit status and the last lines it wrote)."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(cfg)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout}s"}
    wall = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**cfg, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "child_wall_s": wall}


def parse_args(parser: argparse.ArgumentParser, argv, run_child, *, timeout: int | None = None):
    """Parse a benchmark's arguments, adding the hidden --child (and, with a `timeout`, --timeout
    and --json); in a child, run `run_child(cfg)`, print its RESULT line and return None."""
    if timeout is not None:
        parser.add_argument("--timeout", type=int, default=timeout, help="seconds a configuration's process may run")
        parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return None
    return args
