"""Peak resident memory and page faults of a 3-step `hpd distill` run at a 64k vocabulary.

The models are benchmarks.chat_assets' small Qwen2 pair with the vocabulary widened to 65536
(tied embeddings; the rows use the first 4096 ids), batch 4 x 512 tokens (rows of 480-512
tokens, about half of them prompt), hpd, float32, CPU. Each configuration is one
`hpd distill` process; its peak RSS (ru_maxrss), minor page faults, user and system time
come from getrusage of the finished child, so each figure is that run's own.

Configurations: the chunked loss (--chunk-size auto) at two chunk budgets and the plain
loss, each with glibc's malloc defaults and with the thresholds `hpd` sets at start
(hpd.train.allocator). --extra adds more (flags for `hpd distill`; KEY=VALUE sets the
environment), e.g. 'mmap 4GiB:--chunked,on,MALLOC_MMAP_THRESHOLD_=4294967296'.

    python -m benchmarks.memory_peak                    # the default set, once each
    python -m benchmarks.memory_peak --repeat 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import launch, parse_args
from benchmarks.chat_assets import build_assets

# The `hpd` command tunes glibc malloc at start (hpd.train.allocator) unless a MALLOC_* variable
# is set: MALLOC_PERTURB_=0 (glibc's default, no effect of its own) keeps glibc's defaults.
DEFAULTS = "MALLOC_PERTURB_=0"
DEFAULT = {
    "chunked, budget 256, glibc defaults": ["--chunked", "on", "--chunk-budget-mb", "256", DEFAULTS],
    "chunked, budget 64, glibc defaults": ["--chunked", "on", "--chunk-budget-mb", "64", DEFAULTS],
    "chunked, budget 256, hpd allocator": ["--chunked", "on", "--chunk-budget-mb", "256"],
    "chunked, budget 64, hpd allocator": ["--chunked", "on", "--chunk-budget-mb", "64"],
    "plain, glibc defaults": ["--chunked", "off", DEFAULTS],
    "plain, hpd allocator": ["--chunked", "off"],
}


def widen_vocab(folder: Path, vocab: int) -> None:
    """Re-initialise the model in `folder` with a `vocab`-row embedding (tokenizer unchanged)."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(config))


def run(cfg: dict) -> dict:
    """One `hpd distill` process of configuration cfg["name"] (its flags and KEY=VALUE environment in
    cfg["args"]), measured by getrusage once it has finished."""
    root, name, args, threads = Path(cfg["root"]), cfg["name"], cfg["args"], cfg["threads"]
    flags = [a for a in args if "=" not in a or a.startswith("--")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--")))
    out = Path(tempfile.mkdtemp(prefix="mem-")) / "out"
    cmd = [sys.executable, "-m", "hpd.cli.main", "distill", "--teacher", str(root / "teacher"),
           "--student", str(root / "student"), "--data", str(root / "train.jsonl"), "--out", str(out),
           "--method", "hpd", "--steps", "3", "--batch-size", "4", "--max-length", "512", "--no-progress",
           "--lr", "1e-4", *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1:]}
    return {"name": name, "peak_mib": after.ru_maxrss / 1024, "minor_faults": after.ru_minflt - before.ru_minflt,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime, "wall_s": wall,
            "path": next((ln for ln in done.stderr.splitlines() if ln.startswith("distilling")), "")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="names of the default configurations to run")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME:ARG,ARG",
                    help="more configurations, e.g. 'budget 64:--chunk-budget-mb,64'")
    args = parse_args(ap, argv, run)
    if args is None:  # a child: it has printed its result
        return
    configs = {k: v for k, v in DEFAULT.items() if not args.only or k in args.only}
    for item in args.extra:
        name, _, rest = item.partition(":")
        configs[name] = rest.split(",")
    root = Path(tempfile.mkdtemp(prefix="mem-assets-"))
    build_assets(root, rows=16, prompt=(230, 250), completion=(240, 255))
    for name in ("teacher", "student"):
        widen_vocab(root / name, args.vocab)
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: each run gets a fresh parent
    rows = []
    for rep in range(args.repeat):
        for name, flags in configs.items():
            rows.append(launch("benchmarks.memory_peak", {"root": str(root), "name": name, "args": flags,
                                                          "threads": args.threads}))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nvocab {args.vocab}, batch 4 x 512, 3 steps of hpd, threads {args.threads}\n")
    print("| configuration | peak RSS MiB | minor faults | user s | sys s | wall s |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} |")
            continue
        print(f"| {r['name']} | {r['peak_mib']:.0f} | {r['minor_faults']} | {r['user_s']:.1f} | {r['sys_s']:.1f} | "
              f"{r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
