"""One distillation step on CPU: hpd's plain loss, hpd's chunked loss and TRL's GKDTrainer.

A step is: teacher forward without gradient, student forward, loss, backward, gradient
clipping (max norm 1.0) and an AdamW step, on small random LlamaForCausalLM models
(vocabulary 32000, student hidden 256, teacher hidden 512, 2 layers each by default).
Every configuration runs in a fresh subprocess (this module re-invokes itself with
--child), so each one's peak RSS is its own: the child reports ru_maxrss and its RSS just
before its first step (models, optimizer, trainer and batches built), and the table shows
the peak and the difference. Each child runs --warmup untimed steps (on --warmup-batch
rows at the same length: enough to allocate AdamW's state and run every kernel once)
and then --iters timed steps on the full batch; the median is reported, with every timed
step listed, and the 1-min load average, since a shared machine makes timings noisy.

Paths:
  plain    hpd.loss on full (B, T, V) logits, through TorchBackend (forward /
           forward_backward / optimizer_step), as hpd's training loop runs it.
  chunked  hpd.chunked_loss on final hidden states + output head, through the same
           backend calls with hidden=True (the loop's default for Llama models).
  trl      trl.experimental.gkd.GKDTrainer with lmbda=0 (offline, no generation), built
           once; each step is GKDTrainer.training_step (its compute_loss: student and
           teacher forwards + generalized_jsd_loss, then accelerator.backward), then
           accelerator.clip_grad_norm_, optimizer.step and zero_grad, as Trainer's inner
           loop does. TRL is an optional dependency of this script only (rows are
           skipped without it).

Like with like: hpd jsd (beta 0.5) vs TRL beta 0.5, hpd fkl vs TRL beta 0 (TRL's beta=0
is forward KL: the same convention as hpd's jsd). hpd's own `hpd` objective is timed on
the plain and chunked paths beside them. All paths use the same models (same seeds), the
same batches, the same AdamW (hpd's TorchBackend.make_optimizer, handed to the trainer),
float32, no autocast, no gradient checkpointing, use_cache=False; the loss of the first
step (identical models and batch) is printed as a check that the objectives agree.

    python -m benchmarks.chunked_vs_trl                  # full run: seq 512 and 2048, batch 4
    python -m benchmarks.chunked_vs_trl --quick          # smoke check, about a minute
    python -m benchmarks.chunked_vs_trl --seq 2048 --batch 4 8 --iters 3 --chunk-size 1024 256
    python -m benchmarks.chunked_vs_trl --env MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
    python -m benchmarks.chunked_vs_trl --seq 2048 --batch 1 --methods fkl jsd --paths chunked trl --prompt-fraction 0.5

At seq 2048, batch 4 the plain path peaks at ~10 GB and TRL's jsd at ~18 GB (its
generalized_jsd_loss stacks two (B, T, V) float32 tensors), so batch 8 (about twice
that) is not in the default run. The default run took ~16.5 min on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from operator import itemgetter

from benchmarks._common import child_env, launch, parse_args, peak_rss_mib, rss_mib

PATHS = ("plain", "chunked", "trl")
TRL_BETA = {"jsd": 0.5, "fkl": 0.0}  # hpd method -> TRL beta with the same objective
HPD_PARAMS = {"jsd": {"beta": 0.5}, "fkl": {}, "hpd": {}}


# ---------------------------------------------------------------------------- child


def _models(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed, hidden, layers, heads):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=cfg["vocab"], hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(cfg["seq"], 2048),
            tie_word_embeddings=False, use_cache=False, attention_dropout=0.0,
        )
        return LlamaForCausalLM(config).to(torch.float32)

    student = build(0, cfg["student_hidden"], cfg["student_layers"], 4)
    teacher = build(1, cfg["teacher_hidden"], cfg["teacher_layers"], 8)
    student.train()
    teacher.eval()
    teacher.requires_grad_(False)
    return student, teacher


def _batches(cfg):
    """warmup + iters batches of random token ids, the same in every child.

    Warmup batches have cfg["warmup_batch"] rows (the full batch when 0): a warmup step
    only has to allocate AdamW's state and run every kernel once at this length."""
    import numpy as np

    rng = np.random.default_rng(1234)
    out = []
    for i in range(cfg["warmup"] + cfg["iters"]):
        rows = cfg["warmup_batch"] if i < cfg["warmup"] and cfg["warmup_batch"] > 0 else cfg["batch"]
        ids = rng.integers(3, cfg["vocab"], size=(rows, cfg["seq"]), dtype=np.int64)
        targets = np.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]  # logits[:, t] scores ids[:, t + 1]; the last position has none
        targets[:, :int(cfg.get("prompt_fraction", 0.0) * cfg["seq"])] = -100  # a masked prompt
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "targets": targets})
    return out


class _OptConfig:
    lr = 1e-5
    weight_decay = 0.0
    adam_beta1, adam_beta2, adam_eps = 0.9, 0.999, 1e-8


def _backend():
    from hpd.backends.torch.backend import TorchBackend

    class _BackendConfig:
        device = "cpu"
        gradient_checkpointing = False

    return TorchBackend(_BackendConfig())


def _hpd_stepper(cfg, student, teacher):
    import hpd

    backend = _backend()
    optimizer = backend.make_optimizer(student, _OptConfig())
    chunked = cfg["path"] == "chunked"
    method, params = cfg["method"], HPD_PARAMS[cfg["method"]]

    def step(batch):
        arrays = backend.to_arrays(batch)
        targets = arrays["targets"]
        teacher_out = backend.forward(teacher, arrays, hidden=chunked)

        def loss_fn(out):
            if chunked:
                return hpd.chunked_loss(method, out.hidden, out.head, teacher_out.hidden, teacher_out.head,
                                        targets, chunk_size=cfg["chunk_size"], **params)
            return hpd.loss(method, out.logits, teacher_out.logits, targets, **params)

        value, _ = backend.forward_backward(student, arrays, loss_fn, hidden=chunked)
        backend.optimizer_step(student, optimizer, _OptConfig.lr, 1.0)
        return value

    return step


def _tokenizer():
    """A tiny in-memory tokenizer: GKDTrainer needs a processing_class (pad token id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _trl_stepper(cfg, student, teacher):
    import tempfile
    import warnings

    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    optimizer = _backend().make_optimizer(student, _OptConfig())  # the same AdamW as hpd's
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="gkd-bench-"), lmbda=0.0, beta=TRL_BETA[cfg["method"]], temperature=1.0,
        seq_kd=False, max_length=cfg["seq"], learning_rate=_OptConfig.lr, max_grad_norm=1.0,
        per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_dropout=True,
    )
    # SFTTrainer insists on a train_dataset; GKD skips its preparation and this benchmark
    # feeds training_step its batches directly, so a one-row placeholder is enough.
    placeholder = Dataset.from_dict({"input_ids": [[0]]})
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=placeholder,
                         processing_class=_tokenizer(), data_collator=lambda features: features,
                         optimizers=(optimizer, None))
    # Set by Trainer's own training loop, which this benchmark does not run.
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    opt = trainer.optimizer  # the AdamW passed in (Trainer.train would wrap it; one CPU process needs nothing)

    def step(batch):
        inputs = {
            "input_ids": torch.from_numpy(batch["input_ids"]),
            "attention_mask": torch.from_numpy(batch["attention_mask"]),
            "labels": torch.from_numpy(_labels(batch)),  # GKD shifts labels itself
        }
        loss = trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        model.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _labels(batch):
    """TRL's labels (token t at position t, -100 where not a target) from hpd's targets."""
    labels = batch["input_ids"].copy()
    labels[:, 1:] = batch["targets"][:, :-1]
    labels[:, 0] = -100
    return labels


def run_child(cfg) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    student, teacher = _models(cfg)
    batches = _batches(cfg)
    step = _trl_stepper(cfg, student, teacher) if cfg["path"] == "trl" else _hpd_stepper(cfg, student, teacher)
    rss_before = rss_mib()
    peak_before = peak_rss_mib()
    load_before = os.getloadavg()[0]
    times, losses = [], []
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)  # hpd's student samples
        t0 = time.perf_counter()
        losses.append(step(batch))
        elapsed = time.perf_counter() - t0
        if i >= cfg["warmup"]:
            times.append(elapsed)
    tokens = int((batches[-1]["targets"] != -100).sum())
    med = statistics.median(times)
    return {
        **cfg,
        "times": times,
        "median_s": med,
        "tokens_per_s": tokens / med,
        "first_loss": losses[0],
        "timed_losses": losses[cfg["warmup"]:],
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "rss_before_mib": rss_before,
        "peak_before_mib": peak_before,
        "peak_rss_mib": peak_rss_mib(),
        "threads_used": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------- parent


def configs(args):
    for batch in args.batch:
        for seq in args.seq:
            for method in args.methods:
                for path in args.paths:
                    if path == "trl" and method not in TRL_BETA:
                        continue
                    for chunk_size in args.chunk_size if path == "chunked" else [args.chunk_size[0]]:
                        yield {
                            "path": path, "method": method, "seq": seq, "batch": batch, "vocab": args.vocab,
                            "student_hidden": args.student_hidden, "teacher_hidden": args.teacher_hidden,
                            "student_layers": args.student_layers, "teacher_layers": args.teacher_layers,
                            "chunk_size": chunk_size, "threads": args.threads, "warmup": args.warmup,
                            "warmup_batch": args.warmup_batch, "iters": args.iters,
                            "prompt_fraction": args.prompt_fraction,
                        }


def _groups(cfgs: list) -> list:
    """The configurations grouped by shape and objective, in order: one group's paths are compared."""
    groups = {}
    for cfg in cfgs:
        groups.setdefault((cfg["seq"], cfg["batch"], cfg["method"]), []).append(cfg)
    return list(groups.values())


def _label(r, args) -> str:
    if r["path"] == "trl":
        return f"TRL GKD beta={TRL_BETA[r['method']]:g}"
    if r["path"] == "chunked" and len(args.chunk_size) > 1:
        return f"hpd chunked ({r['chunk_size']})"
    return f"hpd {r['path']}"


def _objective(r) -> str:
    return {"jsd": "jsd (beta 0.5)", "fkl": "fkl (forward KL)", "hpd": "hpd"}[r["method"]]


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _delta(r):
    return None if r is None else r["peak_rss_mib"] - r["rss_before_mib"]


def header(args) -> str:
    warm = "full batch" if args.warmup_batch == 0 else f"batch {args.warmup_batch}, same length"
    env = f" Child environment: {' '.join(args.env)}." if args.env else ""
    return (
        f"CPU, torch.set_num_threads({args.threads}) (and OMP/MKL_NUM_THREADS={args.threads}); float32; vocab "
        f"{args.vocab}; student Llama hidden {args.student_hidden} x {args.student_layers} layers, teacher hidden "
        f"{args.teacher_hidden} x {args.teacher_layers} layers; hpd chunk_size "
        f"{', '.join(map(str, args.chunk_size))}. Each configuration in a fresh subprocess: {args.warmup} warmup "
        f"step(s) ({warm}), then the median of {args.iters} timed steps (all timed steps listed). A step = teacher "
        "forward (no grad) + student forward + loss + backward + clip_grad_norm(1.0) + AdamW step. Target tok/s = "
        "target positions / median step. Peak RSS = the child's ru_maxrss; step Δ = peak minus the child's RSS "
        "just before its first step (models, optimizer, trainer, batches already built), i.e. what the steps add "
        "(logits, activations, gradients, AdamW state). Load = 1-min load average at the child's first step / at "
        f"its end (other processes shared the machine when it is above {args.threads}). TRL rows: "
        "GKDTrainer(lmbda=0).training_step (its compute_loss: student + teacher forwards, generalized_jsd_loss; "
        f"accelerator.backward) + the same clip and AdamW step.{env}"
    )


def report(results, args) -> str:
    out = [header(args), ""]
    out.append("| seq | batch | objective | path | round | step s (median) | timed steps s | target tok/s | "
               "peak RSS MiB | step Δ RSS MiB | loss, first step | load |")
    out.append("|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        head = f"| {r['seq']} | {r['batch']} | {_objective(r)} | {_label(r, args)} | {r.get('round', 0)} |"
        if "error" in r:
            out.append(f"{head} error: {r['error']} | | | | | | |")
            continue
        times = ", ".join(f"{t:.1f}" for t in r["times"])
        load = "/".join(f"{x:.1f}" for x in r["load_avg_1min"])
        out.append(f"{head} {r['median_s']:.2f} | {times} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                   f"{_delta(r):.0f} | {r['first_loss']:.6f} | {load} |")

    rounds = sorted({r.get("round", 0) for r in results})

    def find(seq, batch, method, path, round_):
        for r in results:
            if (r["seq"], r["batch"], r["method"], r["path"], r.get("round", 0)) == (seq, batch, method, path, round_) \
                    and "error" not in r and (path != "chunked" or r["chunk_size"] == args.chunk_size[0]):
                return r
        return None

    def paired(seq, batch, method, num, den, key):
        """The median over rounds of num's key / den's key, each round's pair run back to back."""
        got = []
        for k in rounds:
            a, b = find(seq, batch, method, num, k), find(seq, batch, method, den, k)
            if a is not None and b is not None and key(a) is not None and key(b):
                got.append(key(a) / key(b))
        return (statistics.median(got), got) if got else (None, [])

    def cell(value) -> str:
        median, got = value
        if median is None:
            return "n/a"
        return f"{median:.2f}x" + (f" ({min(got):.2f}-{max(got):.2f})" if len(got) > 1 else "")

    out += ["", f"Ratios, measured in this run (chunked = chunk_size {args.chunk_size[0]})"
            + (f"; each the median over {len(rounds)} rounds of the ratio within a round (min-max), the paths "
               "of a round run back to back" if len(rounds) > 1 else "") + ":", ""]
    out.append("| seq | batch | objective | chunked/plain step Δ RSS | chunked/plain peak RSS | chunked/plain step "
               "time | plain/TRL tok/s | chunked/TRL tok/s |")
    out.append("|---:|---:|---|---:|---:|---:|---:|---:|")
    goals = []
    pk, tm, tps = itemgetter("peak_rss_mib"), itemgetter("median_s"), itemgetter("tokens_per_s")
    for batch in args.batch:
        for seq in args.seq:
            for method in args.methods:
                here = {x: any(find(seq, batch, method, x, k) for k in rounds) for x in PATHS}
                if not (here["plain"] or here["chunked"]):
                    continue
                trl = method in TRL_BETA and here["trl"]
                delta, peak, time_ = (paired(seq, batch, method, "chunked", "plain", key) for key in (_delta, pk, tm))
                vs_trl = {x: paired(seq, batch, method, x, "trl", tps) for x in ("plain", "chunked")}
                cells = [cell(delta), cell(peak), cell(time_), cell(vs_trl["plain"]) if trl else "-",
                         cell(vs_trl["chunked"]) if trl else "-"]
                out.append(f"| {seq} | {batch} | {method} | " + " | ".join(cells) + " |")
                if seq == 2048 and delta[0] is not None:
                    dr, pr, tr = delta[0], peak[0], time_[0]
                    goals.append(f"- seq 2048, batch {batch}, {method}: chunked peak memory <= 0.4x plain: step Δ "
                                 f"{dr:.2f}x ({_met(dr <= 0.4)}), whole-process peak {pr:.2f}x ({_met(pr <= 0.4)}); "
                                 f"chunked step time <= 1.1x plain: {tr:.2f}x ({_met(tr <= 1.1)})")
                if trl:
                    # issue 23's goal at the long shape is 2x TRL (fkl and jsd); 1.3x elsewhere
                    goal = 2.0 if seq >= 2048 else 1.3
                    parts = [f"{name} {v[0]:.2f}x ({_met(v[0] >= goal)})" for name, v in vs_trl.items()
                             if v[0] is not None]
                    goals.append(f"- seq {seq}, batch {batch}, {method}: hpd tok/s >= {goal:g}x TRL's: "
                                 + ", ".join(parts))
    out += ["", "Goals:"]
    if not any(seq == 2048 for seq in args.seq):
        out.append("- (the memory and step-time goals are stated at seq 2048, which this run did not include)")
    out += goals or ["- (nothing to compare)"]
    return "\n".join(out)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 512 2048)")
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 4)")
    ap.add_argument("--methods", nargs="+", choices=list(HPD_PARAMS), help="default: jsd fkl hpd")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--chunk-size", type=str, nargs="+", default=["auto"],
                    help="hpd chunk sizes (one chunked row each; ratios use the first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-fraction", type=float, default=0.0,
                    help="share of each row's leading positions that are a masked prompt (no target)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    ap.add_argument("--warmup-batch", type=int, default=1,
                    help="rows in a warmup batch (0: the full batch); the default keeps the full run short")
    ap.add_argument("--iters", type=int, help="timed steps per configuration, median reported (default 2)")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra environment for every child, e.g. MALLOC_MMAP_THRESHOLD_=4294967296")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every configuration this many times, the paths of one shape back to back and in "
                    "reverse order every other round; ratios are the median over rounds of each round's ratio, so "
                    "that a change in the machine's load falls on both sides of a ratio")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check (~1 min): seq 128, batch 2, jsd and hpd, 1 warmup + 1 timed step, "
                         "unless given otherwise")
    args = parse_args(ap, argv, run_child, timeout=900)
    if args is None:  # a child: it has printed its result
        return
    defaults = dict(seq=[128], batch=[2], methods=["jsd", "hpd"], iters=1) if args.quick else \
        dict(seq=[512, 2048], batch=[4], methods=["jsd", "fkl", "hpd"], iters=2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    if "trl" in args.paths:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: skipping the TRL rows (pip install trl)", file=sys.stderr)
            args.paths = [p for p in args.paths if p != "trl"]

    results = []
    todo = []
    for k in range(args.rounds):
        # the paths of one shape stay together; every other round runs them in reverse order
        for group in _groups(list(configs(args))):
            todo += [{**cfg, "round": k} for cfg in (group[::-1] if k % 2 else group)]
    started = time.perf_counter()
    for i, cfg in enumerate(todo, 1):
        r = launch("benchmarks.chunked_vs_trl", cfg, timeout=args.timeout,
                   env=child_env(cfg["threads"], **extra_env))
        results.append(r)
        msg = r.get("error") or f"{r['median_s']:.2f} s/step, peak {r['peak_rss_mib']:.0f} MiB"
        print(f"[{i}/{len(todo)} {time.perf_counter() - started:.0f}s] round {cfg['round']} seq {cfg['seq']} batch "
              f"{cfg['batch']} {cfg['method']} {cfg['path']} (chunk {cfg['chunk_size']}): {msg}", file=sys.stderr,
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(report(results, args))
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
