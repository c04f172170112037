"""Where one hpd torch training step spends its time, beside the floor of any distillation step.

The step is hpd's own `Loop.train_step` (hpd.train.loop) on a `TorchBackend`, the way `hpd distill`
runs it, with timers around the backend calls it makes:

  teacher    backend.forward(teacher): the teacher's forward, no gradient (hidden states on
             the chunked path, full logits on the plain one)
  student    the student's forward inside backend.forward_backward (hidden states, or logits)
  loss       the step's loss_fn (on the chunked path this includes both heads' logits and
             the head's closed-form gradients, hpd.objectives.chunked)
  backward   loss.backward() (the rest of forward_backward)
  optimizer  backend.optimizer_step: gradient clipping and the fused AdamW step
  other      the rest of train_step: collating, host -> device copies, token counts, metrics

On CUDA each boundary synchronises the device, so a phase's time is its own. Each phase is
the median over --iters steps after --warmup untimed ones (the step's total is its own
median, so the phases need not add up to it exactly); --repeat runs the whole measurement in
that many fresh processes and reports the median and the spread (min-max) across them.

The floor is what any distillation step of these two models pays without a distillation
loss: the teacher's decoder forward (no gradient, no head), the student's forward with its
head on the supervised positions only, a plain cross-entropy on those logits, backward, the
same clipping and fused AdamW step. hpd / floor is the price of the objective (both heads
over the vocabulary, the softmaxes, the rule) and of the loop's bookkeeping. The floor's
steps are interleaved with hpd's (alternating), so load drift falls on both alike.

Shapes (--preset sets the defaults; flags override):
  chat   benchmarks.chat_vs_trl's models (Qwen2, teacher 256 wide x 4 layers, student
         128 x 5, tied heads), vocabulary 4096, batch 8, rows of ~61 tokens (+-4), ~40% prompt
  long   benchmarks.chunked_vs_trl's models (Llama, teacher 512 x 2, student 256 x 2,
         untied), vocabulary 32000, batch 4, rows of 2048 tokens, no prompt, no padding

    python -m benchmarks.profile_step --preset chat --method fkl
    python -m benchmarks.profile_step --preset long --method jsd --iters 3 --threads 2
    python -m benchmarks.profile_step --preset chat --hpd-args chunked=off compile=on
    python -m benchmarks.profile_step --seq 256 --batch 4 --vocab 32000 --prompt-share 0.5 --method hpd

Random weights and random token ids: the timings depend on shapes, not on values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

from benchmarks._common import child_env, launch, parse_args

PHASES = ("teacher", "student", "loss", "backward", "optimizer", "other")
PRESETS = {
    "chat": dict(arch="qwen2", vocab=4096, batch=8, seq=61, spread=4, prompt_share=0.4, teacher_hidden=256,
                 teacher_layers=4, teacher_inter=1024, teacher_heads=8, student_hidden=128, student_layers=5,
                 student_inter=512, student_heads=4, tied=True),
    "long": dict(arch="llama", vocab=32000, batch=4, seq=2048, spread=0, prompt_share=0.0, teacher_hidden=512,
                 teacher_layers=2, teacher_inter=1024, teacher_heads=8, student_hidden=256, student_layers=2,
                 student_inter=512, student_heads=4, tied=False),
}
METHOD_PARAMS = {"jsd": {"beta": 0.5}}


# ---------------------------------------------------------------------------- child


def build_models(cfg, device, dtype="auto"):
    """Random models; --dtype as hpd loads them (auto: on CUDA a bfloat16 teacher, the
    student float32 under bfloat16 autocast)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    def build(role, seed):
        kind = LlamaConfig if cfg["arch"] == "llama" else Qwen2Config
        extra = {} if cfg["arch"] == "llama" else {"num_key_value_heads": 2}
        hidden, heads = cfg[f"{role}_hidden"], cfg[f"{role}_heads"]
        config = kind(vocab_size=cfg["vocab"], hidden_size=hidden, intermediate_size=cfg[f"{role}_inter"],
                      num_hidden_layers=cfg[f"{role}_layers"], num_attention_heads=heads,
                      max_position_embeddings=max(2048, cfg["seq"] + cfg["spread"] + 1),
                      tie_word_embeddings=cfg["tied"], use_cache=False, **extra)
        torch.manual_seed(seed)
        if dtype in names:
            kind = names[dtype]
        else:
            kind = torch.bfloat16 if role == "teacher" and torch.device(device).type == "cuda" else torch.float32
        return AutoModelForCausalLM.from_config(config, dtype=kind).to(device)

    student = build("student", 2).train()
    teacher = build("teacher", 1).eval().requires_grad_(False)
    return student, teacher


class Rows:
    """Endless collated micro-batches of random rows (hpd.data.batches.collate: right padding,
    targets masked over the prompt), the same in every process."""

    def __init__(self, cfg):
        import numpy as np

        from hpd.data.examples import Example
        from hpd.data.batches import collate

        rng = np.random.default_rng(1234)
        self.batches = []
        for _ in range(cfg["warmup"] + cfg["iters"]):
            rows = []
            for _ in range(cfg["batch"]):
                n = int(cfg["seq"] + rng.integers(-cfg["spread"], cfg["spread"] + 1))
                prompt = min(n - 1, int(round(cfg["prompt_share"] * n)))
                ids = rng.integers(4, cfg["vocab"], size=n).tolist()
                rows.append(Example(ids, [i >= max(prompt, 1) for i in range(n)], prompt))
            self.batches.append(collate(rows, 0))
        self.i, self.epoch = 0, 0

    def __next__(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


class Timers:
    def __init__(self, device):
        self.device = device
        self.now: dict[str, float] = {}

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - t0


def instrument(backend, timers):
    """Wrap the backend's calls (on this instance only) in the phase timers."""
    forward, run, optimizer_step = backend.forward, backend.run_model, backend.optimizer_step
    inside = {"fb": False}

    def timed_forward(model, batch, *, hidden=False):
        with timers.phase("teacher"):
            return forward(model, batch, hidden=hidden)

    def timed_run(model, batch, hidden):
        if not inside["fb"]:
            return run(model, batch, hidden)
        with timers.phase("student"):
            return run(model, batch, hidden)

    fb = type(backend).forward_backward

    def timed_forward_backward(model, batch, loss_fn, *, hidden=False):
        import torch

        def timed_loss(out):
            with timers.phase("loss"):
                return loss_fn(out)

        inside["fb"] = True
        backward = torch.Tensor.backward

        def timed_backward(self, *a, **k):
            with timers.phase("backward"):
                return backward(self, *a, **k)

        torch.Tensor.backward = timed_backward
        try:
            return fb(backend, model, batch, timed_loss, hidden=hidden)
        finally:
            torch.Tensor.backward = backward
            inside["fb"] = False

    def timed_optimizer_step(*a, **k):
        with timers.phase("optimizer"):
            return optimizer_step(*a, **k)

    backend.forward, backend.run_model = timed_forward, timed_run
    backend.forward_backward, backend.optimizer_step = timed_forward_backward, timed_optimizer_step


def make_config(cfg):
    from hpd.train.config import DistillConfig

    fields = dict(method=cfg["method"], method_params=METHOD_PARAMS.get(cfg["method"], {}), batch_size=cfg["batch"],
                  lr=1e-5, device=cfg["device"], steps=cfg["warmup"] + cfg["iters"],
                  max_length=cfg["seq"] + cfg["spread"] + 1)
    fields.update(cfg["hpd_args"])
    return DistillConfig.from_dict(fields)


def make_loop(cfg, config, backend, student, teacher):
    from hpd.train.loop import Loop
    from hpd.train.run import choose_loss_path
    from hpd.train.schedule import Schedule

    steps = cfg["warmup"] + cfg["iters"]
    chunked, path = choose_loss_path(config.chunked, backend, student=student, teacher=teacher)
    schedule = Schedule(config.schedule_config(), method=config.method, method_params=dict(config.method_params),
                        total_steps=steps, seed=0)
    loop = Loop(backend=backend, config=config, student=student, teacher=teacher, tokenizer=None,
                optimizer=backend.make_optimizer(student, config), batches=Rows(cfg), schedule=schedule,
                total_steps=steps, vocab=cfg["vocab"], chunked=chunked)
    return loop, path


def floor_stepper(cfg, backend, student, teacher):
    """Two forwards, one backward, clipping and AdamW, no distillation loss."""
    import torch
    import torch.nn.functional as F

    from hpd.backends.torch import family
    from hpd.backends.torch.backend import model_inputs

    class Opt:
        lr, weight_decay, adam_beta1, adam_beta2, adam_eps = 1e-5, 0.0, 0.9, 0.999, 1e-8

    optimizer = backend.make_optimizer(student, Opt())
    rows = Rows(cfg)
    head = family.head_module(student)

    def step():
        mb = next(rows)
        arrays = backend.to_arrays(mb)
        inputs = model_inputs(arrays)
        with torch.no_grad():
            family.hidden_states(teacher, **inputs)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if backend.device.type == "cuda" \
            and next(student.parameters()).dtype == torch.float32 else torch.autocast("cpu", enabled=False)
        with autocast:  # as TorchBackend.forward_backward runs the student
            h = family.hidden_states(student, **inputs)
        mask = arrays["targets"] != -100
        loss = F.cross_entropy(head(h[mask]).float(), arrays["targets"][mask])
        loss.backward()
        backend.optimizer_step(student, optimizer, 1e-5, 1.0)
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)

    return step


def run_child(cfg) -> dict:
    import torch

    from hpd.backends.torch.backend import TorchBackend

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    from hpd.train.config import DistillConfig

    config = make_config(cfg)
    backend = TorchBackend(config)  # as hpd distill builds it (--device, --compile, ...)
    cfg["device"] = backend.device.type
    student, teacher = build_models(cfg, backend.device, config.dtype)
    loop, path = make_loop(cfg, config, backend, student, teacher)
    timers = Timers(backend.device)
    instrument(backend, timers)
    floor = None
    if cfg["floor"]:  # its own copies of the models, trained by its own optimizer
        floor_backend = TorchBackend(DistillConfig.from_dict({"device": cfg["device"], "compile": "off"}))
        floor = floor_stepper(cfg, floor_backend, *build_models(cfg, backend.device, config.dtype))
    per_phase = {p: [] for p in PHASES}
    totals, floors = [], []
    for i in range(cfg["warmup"] + cfg["iters"]):
        timers.now = {}
        timers.sync()
        t0 = time.perf_counter()
        loop.train_step(loop.schedule.plan(loop.state.step))
        timers.sync()
        total = time.perf_counter() - t0
        if floor is not None:
            f0 = time.perf_counter()
            floor()
            f = time.perf_counter() - f0
        if i < cfg["warmup"]:
            continue
        totals.append(total)
        if floor is not None:
            floors.append(f)
        for p in PHASES[:-1]:
            per_phase[p].append(timers.now.get(p, 0.0))
        per_phase["other"].append(total - sum(timers.now.values()))
    extra = {}
    if getattr(backend, "compiler", None) is not None:
        extra["compile"] = backend.compiler.stats()
    tokens = int(sum((b["targets"] != -100).sum() for b in loop.batches.batches[:1]))
    return {**cfg, "path": path, "median_s": {p: statistics.median(v) for p, v in per_phase.items()},
            "total_s": statistics.median(totals), "floor_s": statistics.median(floors) if floors else None,
            "supervised_tokens": tokens, "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0],
            **extra}


# ---------------------------------------------------------------------------- parent


def _ms(values) -> str:
    med = statistics.median(values) * 1000
    if len(values) == 1:
        return f"{med:.1f}"
    return f"{med:.1f} ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})"


def report(results) -> str:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return "\n".join(f"error: {r['error']}" for r in results)
    r0 = ok[0]
    lines = [f"{r0['preset'] or 'custom'} shape: {r0['arch']} teacher {r0['teacher_hidden']}x{r0['teacher_layers']}, "
             f"student {r0['student_hidden']}x{r0['student_layers']}, vocabulary {r0['vocab']}, batch {r0['batch']}, "
             f"rows {r0['seq']}+-{r0['spread']} tokens, prompt share {r0['prompt_share']}, "
             f"{r0['supervised_tokens']} supervised tokens in the first batch; method {r0['method']}; "
             f"{r0['path']}; device {r0['device']}, torch threads {r0['threads']}; "
             f"median of {r0['iters']} steps after {r0['warmup']}, {len(ok)} process(es): median (min-max) ms",
             f"hpd overrides: {' '.join(f'{k}={v}' for k, v in r0['hpd_args'].items()) or 'none'}", "",
             "| phase | ms | share of the step |", "|---|---:|---:|"]
    total = statistics.median(r["total_s"] for r in ok)
    for p in PHASES:
        values = [r["median_s"][p] for r in ok]
        lines.append(f"| {p} | {_ms(values)} | {statistics.median(values) / total:.0%} |")
    lines.append(f"| **step** | {_ms([r['total_s'] for r in ok])} | |")
    if ok[0]["floor_s"] is not None:
        floors = [r["floor_s"] for r in ok]
        lines.append(f"| floor (2 forwards, CE, backward, AdamW) | {_ms(floors)} | |")
        ratios = [r["total_s"] / r["floor_s"] for r in ok]
        lines.append(f"| **step / floor** | {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | |")
    compiles = [r["compile"] for r in ok if r.get("compile")]
    if compiles:
        lines.append(f"\ncompile: {compiles[0]}")
    lines.append("\nload average (1 min) at the end of each process: "
                 + ", ".join(f"{r['load_avg_1min']:.1f}" for r in ok))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="chat")
    ap.add_argument("--seq", type=int, help="mean row length in tokens")
    ap.add_argument("--spread", type=int, help="row lengths vary uniformly by +- this (padding)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--prompt-share", type=float, help="share of each row that is prompt (no target)")
    for role in ("teacher", "student"):
        for what in ("hidden", "layers"):
            ap.add_argument(f"--{role}-{what}", type=int)
    ap.add_argument("--method", default="fkl")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes; the spread is across them")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor steps")
    ap.add_argument("--hpd-args", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="DistillConfig overrides, e.g. chunked=off compile=on chunk_budget_mb=256")
    args = parse_args(ap, argv, run_child, timeout=1800)
    if args is None:  # a child: it has printed its result
        return
    import yaml

    cfg = dict(PRESETS[args.preset], preset=args.preset)
    for key in ("seq", "spread", "batch", "vocab", "prompt_share", "teacher_hidden", "teacher_layers",
                "student_hidden", "student_layers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(method=args.method, device=args.device, threads=args.threads, warmup=args.warmup,
               iters=args.iters, floor=not args.no_floor,
               hpd_args={k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.hpd_args)})
    results = []
    for i in range(args.repeat):
        r = launch("benchmarks.profile_step", cfg, timeout=args.timeout, env=child_env(cfg["threads"]))
        results.append(r)
        print(f"process {i + 1}: " + (r.get("error") or f"step {r['total_s'] * 1000:.1f} ms"
                                      + (f", floor {r['floor_s'] * 1000:.1f} ms" if r.get("floor_s") else "")),
              file=sys.stderr, flush=True)
    print(report(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
