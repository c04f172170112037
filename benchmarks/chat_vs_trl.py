"""Step time on short chat shapes: `hpd distill`'s loop, TRL's GKDTrainer, a plain loop, the floor.

The models: a Qwen2 teacher of ~4.9M parameters and a student of ~1.8M (tied embeddings),
vocabulary 4096, batch 8, float32 on CPU, one torch thread. The rows (prompt/completion,
prompt masked) are ~61 tokens each; --shapes picks how much of that is prompt:

  chat            prompt 18-26 tokens, completion 33-41 (~38% prompt): the issue's shape
  prompt-heavy    prompt 42-50, completion 9-17 (~75% prompt)
  response-heavy  prompt 2-6, completion 49-57 (~8% prompt)

Paths, all on the same models and rows:

  hpd        hpd.distill(...) as `hpd distill` builds it; each Loop.train_step is timed (it
             includes collating the batch, the teacher forward, the loss and the AdamW step).
  trl        trl GKDTrainer with lmbda=0 (offline; TRL's temperature only affects
             generation, which lmbda=0 never runs): training_step (its compute_loss:
             student and teacher forwards + generalized_jsd_loss, backward) + clip_grad_norm
             + AdamW step on pre-collated batches, labels with the prompt masked. This skips
             what Trainer.train() sets up: float32, no checkpointing, no collation.
  trl-train  TRL as GKDTrainer.train() runs it with GKDConfig's defaults: bf16=True (CPU
             bfloat16 autocast on both models), gradient_checkpointing=True (the student's
             forward runs twice), DataCollatorForChatML tokenizing every batch's messages,
             Trainer's loop. The other paths' steps run from its on_step_end callback.
  loop       a plain hand-written torch loop: teacher forward, student forward, each head on
             the supervised positions only, the objective there (forward KL, or TRL's jsd at
             beta 0.5), backward, clip, fused AdamW step, on the same pre-collated batches.
  floor      what any distillation step of these models pays without a distillation loss:
             the teacher's decoder forward, the student's forward with its head on the
             supervised positions, a plain cross-entropy, backward, clip, fused AdamW.

Like with like: hpd fkl vs TRL beta 0 vs the loop's forward KL; hpd jsd (beta 0.5) vs TRL
beta 0.5 vs the loop's jsd; TRL computes both models' full-vocabulary log_softmax at every
position (prompt and padding too) in float32, temperature 1, then masks. One fresh
subprocess per shape, objective and round builds every path and interleaves their steps
(rotating the order every step), so that drift in the machine's load falls on all paths
alike; it runs --warmup untimed steps then --iters timed ones and reports each path's
median, then the medians over rounds with their spread.

Why the issue's two short-shape numbers disagreed (TRL / hpd: an outside chat workload fkl
1.69x, jsd 2.06x; this script fkl 0.91-1.03x, jsd 1.18-1.45x), measured with this script
(benchmarks/results/issue-23/):

1. Which TRL step is timed. This script's `trl` path calls training_step on pre-collated
   batches, so TRL runs in float32 without checkpointing. A workload that calls
   trainer.train() with GKDConfig's defaults gets bf16 autocast on CPU (+10% alone) and
   gradient checkpointing (+29% alone: the student forward twice), plus per-batch
   tokenization and Trainer's loop: trl-train / trl is 1.3-1.4x on every shape. That
   alone takes the chat shape's TRL / hpd from 1.05x to 1.42x (fkl) and 1.33x to 1.71x (jsd).
2. The prompt share. hpd's loss touches the vocabulary only at supervised positions; TRL
   at every position. At ~61 tokens the same rows give TRL / hpd (trl-train) fkl 1.26x
   with 8% prompt, 1.42x with 38%, 1.55x with 75%; jsd 1.61x, 1.71x, 2.02x. The outside
   numbers (1.69x, 2.06x) sit between the chat and prompt-heavy shapes' trl-train ratios.
3. Threads. With two torch threads per process on two cores shared with other processes,
   OpenMP's spinning makes every step many times slower and moves the ratios: with
   --threads 2 the chat fkl step took 1.6-5.6 s instead of 0.16-0.29 s, and trl-train /
   hpd read 1.62x instead of 1.42x (jsd 1.72x); two benchmark processes side by side
   contend the same way. This script uses one thread and interleaves all paths in one
   process; compare only ratios measured side by side.
4. What did not matter: padding (right padding, the same rows for all paths), TRL's beta
   (0 for fkl and 0.5 for jsd on both sides), its temperature (1 in the loss; GKDConfig's
   0.9 only affects generation).

hpd / floor is 1.1-1.3x: the rest of an hpd step is the teacher's head over the supervised
positions and the objective (benchmarks.profile_step splits it).

    python -m benchmarks.chat_vs_trl                       # every shape, fkl and jsd, 3 rounds
    python -m benchmarks.chat_vs_trl --shapes chat --methods fkl --rounds 1 --iters 10
    python -m benchmarks.chat_vs_trl --paths hpd trl floor --hpd-args chunked=off   # config overrides for hpd
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import capture_loop, child_env, launch, parse_args
from benchmarks.chat_assets import SHAPES, VOCAB, build_shapes, param_count

TRL_BETA = {"fkl": 0.0, "jsd": 0.5}
PATHS = ("hpd", "trl", "trl-train", "loop", "floor")


# ---------------------------------------------------------------------------- children


def _batches(cfg):
    from transformers import AutoTokenizer

    from hpd.data.batches import Batches, load_dataset
    from hpd.data.examples import pad_id_of

    root = Path(cfg["root"])
    tok = AutoTokenizer.from_pretrained(root / "student")
    data = load_dataset(cfg.get("data") or root / "train.jsonl", tok, 512)
    it = Batches(data, cfg["batch"], pad_id_of(tok), seed=0)
    return [next(it) for _ in range(cfg["warmup"] + cfg["iters"])]


def hpd_stepper(cfg):
    """hpd.distill's own Loop (captured before its first step), so that its steps can be
    interleaved with the other paths'."""
    import yaml

    from hpd.train.config import DistillConfig

    root = Path(cfg["root"])
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in cfg["hpd_args"])}
    config = dict(teacher=str(root / "teacher"), student=str(root / "student"),
                  data=cfg.get("data") or str(root / "train.jsonl"),
                  out=tempfile.mkdtemp(prefix="chat-bench-") + "/out", method=cfg["method"],
                  method_params={"beta": 0.5} if cfg["method"] == "jsd" else {}, steps=cfg["warmup"] + cfg["iters"],
                  batch_size=cfg["batch"], lr=1e-4, max_length=cfg.get("max_length", 512), progress=False, seed=0)
    config.update(overrides)
    loop = capture_loop(DistillConfig.from_dict(config).to_dict())

    def step(batch):  # the loop draws its own batches (the same rows, same order)
        return loop.train_step(loop.schedule.plan(loop.state.step))

    return step


def _models(cfg):
    from transformers import AutoModelForCausalLM

    root = Path(cfg["root"])
    student = AutoModelForCausalLM.from_pretrained(root / "student").train()
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher").eval().requires_grad_(False)
    return student, teacher


def _torch_inputs(batch):
    import torch

    labels = batch["input_ids"].copy()
    labels[:, 1:] = batch["targets"][:, :-1]  # labels[t] = token t, -100 where not a target
    labels[:, 0] = -100
    return {"input_ids": torch.from_numpy(batch["input_ids"]), "attention_mask": torch.from_numpy(batch["attention_mask"]),
            "labels": torch.from_numpy(labels), "targets": torch.from_numpy(batch["targets"])}


def trl_stepper(cfg):
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher = _models(cfg)
    args = GKDConfig(output_dir=tempfile.mkdtemp(prefix="gkd-chat-"), lmbda=0.0, beta=TRL_BETA[cfg["method"]],
                     learning_rate=1e-4, per_device_train_batch_size=cfg["batch"], use_cpu=True, report_to="none",
                     save_strategy="no", logging_strategy="no")
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                         train_dataset=Dataset.from_dict({"input_ids": [[0]]}),
                         processing_class=AutoTokenizer.from_pretrained(Path(cfg["root"]) / "student"),
                         data_collator=lambda features: features)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    model, opt = trainer.model, trainer.optimizer

    def step(batch):
        inputs = _torch_inputs(batch)
        inputs.pop("targets")
        trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        model.zero_grad(set_to_none=True)

    return step


# A chat template for the bench's tokenizer (it has none): "<s>prompt completion</s>",
# the token ids hpd makes of a prompt/completion row, give or take the space.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}{{ m['content'] }} "
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def trl_train(cfg, between, times) -> None:
    """TRL as `GKDTrainer.train()` runs it with GKDConfig's defaults (the `trl` path calls
    training_step on pre-collated batches instead, which skips what train() sets up):
    bf16=True (accelerate wraps both models' forwards in CPU bfloat16 autocast),
    gradient_checkpointing=True (activation checkpointing on the student: its forward runs
    twice), DataCollatorForChatML tokenizing each batch's messages with the chat template
    (left padding), and Trainer's own loop (dataloader, scheduler, callbacks). `between(i)`
    runs the other paths' steps from an on_step_end callback; a TRL step is the time from
    the end of one callback to the start of the next (so it includes fetching and collating)."""
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher = _models(cfg)
    tok = AutoTokenizer.from_pretrained(Path(cfg["root"]) / "student")
    tok.chat_template = CHAT_TEMPLATE
    steps = cfg["warmup"] + cfg["iters"]
    with open(cfg.get("data") or Path(cfg["root"]) / "train.jsonl") as fh:
        rows = [json.loads(line) for line in fh][: steps * cfg["batch"]]
    messages = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
                for r in rows]
    args = GKDConfig(output_dir=tempfile.mkdtemp(prefix="gkd-train-"), lmbda=0.0, beta=TRL_BETA[cfg["method"]],
                     learning_rate=1e-4, per_device_train_batch_size=cfg["batch"], use_cpu=True, report_to="none",
                     save_strategy="no", logging_strategy="no", max_steps=steps, disable_tqdm=True, seed=0)

    class Interleave(TrainerCallback):
        def __init__(self):
            self.i, self.mark = 0, None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.mark is not None and self.i >= cfg["warmup"]:
                times.append(now - self.mark)
            between(self.i)
            self.i += 1
            self.mark = time.perf_counter()

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(messages),
                         processing_class=tok, callbacks=[Interleave()])
    trainer.train()


def floor_stepper(cfg):
    """The floor of any distillation step of these models: the teacher's decoder forward
    (no gradient, no head), the student's forward with its head on the supervised
    positions, a plain cross-entropy there, backward, clip, fused AdamW."""
    import torch
    import torch.nn.functional as F

    student, teacher = _models(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)

    def step(batch):
        inputs = _torch_inputs(batch)
        mask = inputs["targets"] != -100
        kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        with torch.no_grad():
            teacher.model(**kwargs)
        h = student.model(**kwargs).last_hidden_state
        F.cross_entropy(student.lm_head(h[mask]), inputs["targets"][mask]).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def plain_stepper(cfg):
    import torch
    import torch.nn.functional as F

    student, teacher = _models(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)  # as Trainer's default
    half = torch.log(torch.tensor(0.5))

    def logits(model, inputs, mask):  # the head on the supervised positions only
        h = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        use_cache=False).last_hidden_state
        return model.lm_head(h[mask])

    def step(batch):
        inputs = _torch_inputs(batch)
        mask = inputs["targets"] != -100
        with torch.no_grad():
            t_logits = logits(teacher, inputs, mask)
        s_logits = logits(student, inputs, mask)
        lq, lp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        if cfg["method"] == "fkl":
            loss = (lp.exp() * (lp - lq)).sum(-1).mean()
        else:  # TRL's generalized JSD at beta 0.5
            lm = torch.logsumexp(torch.stack([lp + half, lq + half]), 0)
            loss = (0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_child(cfg) -> dict:
    """Every path's steps, interleaved step by step in this one process (rotating the
    order), so that the machine's load falls on all paths alike. With trl-train, TRL's
    own train() drives the steps and the other paths run between its steps."""
    import torch

    torch.set_num_threads(cfg["threads"])
    makers = {"hpd": hpd_stepper, "trl": trl_stepper, "loop": plain_stepper, "floor": floor_stepper}
    steppers = {path: makers[path](cfg) for path in cfg["paths"] if path != "trl-train"}
    batches = _batches(cfg)
    times = {path: [] for path in cfg["paths"]}
    paths = list(steppers)

    def between(i):
        order = paths[i % len(paths):] + paths[:i % len(paths)]
        for path in order:
            t0 = time.perf_counter()
            steppers[path](batches[i])
            if i >= cfg["warmup"]:
                times[path].append(time.perf_counter() - t0)

    if "trl-train" in cfg["paths"]:
        trl_train(cfg, between, times["trl-train"])
    else:
        for i in range(len(batches)):
            between(i)
    return {**cfg, "times": times, "median_s": {p: statistics.median(t) for p, t in times.items() if t},
            "threads_used": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------------------- parent


def _spread(values, fmt="{:.2f}x") -> str:
    med = statistics.median(values)
    return fmt.format(med) + (f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else "")


def report(rows, args) -> str:
    """One line per (shape, objective, round), then the medians over rounds with their spread."""
    ratios = [(f"{p} / hpd", p, "hpd") for p in args.paths if p not in ("hpd", "floor")]
    if "floor" in args.paths:
        ratios.append(("hpd / floor", "hpd", "floor"))
    ratios = [r for r in ratios if r[1] in args.paths and r[2] in args.paths]
    head = ["shape", "objective", "round"] + [f"{p} ms" for p in args.paths] + [r[0] for r in ratios] + ["load"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    groups: dict = {}
    for r in rows:
        key = (r["shape"], r["method"])
        if "error" in r:
            out.append(f"| {r['shape']} | {r['method']} | {r['round']} | error: {r['error']} |")
            continue
        m = r["median_s"]
        cells = [f"{m[p] * 1000:.1f}" for p in args.paths] + [f"{m[a] / m[b]:.2f}x" for _, a, b in ratios]
        out.append(f"| {r['shape']} | {r['method']} | {r['round']} | " + " | ".join(cells)
                   + f" | {r['load_avg_1min']:.1f} |")
        groups.setdefault(key, []).append(m)
    out += ["", "medians over rounds (min-max):", "",
            "| shape | objective | " + " | ".join(f"{p} ms" for p in args.paths) + " | "
            + " | ".join(r[0] for r in ratios) + " |", "|---|---|" + "---:|" * (len(args.paths) + len(ratios))]
    for (shape, method), ms in groups.items():
        cells = [_spread([m[p] * 1000 for m in ms], "{:.1f}") for p in args.paths]
        cells += [_spread([m[a] / m[b] for m in ms]) for _, a, b in ratios]
        out.append(f"| {shape} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["fkl", "jsd"], choices=list(TRL_BETA))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                    help="row shapes (prompt share), each timed with every objective in the same run")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="runs (fresh processes) per shape and objective")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hpd-args", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="config overrides for the hpd path, e.g. chunked=off")
    args = parse_args(ap, argv, run_child, timeout=600)
    if args is None:  # a child: it has printed its result
        return
    root = Path(tempfile.mkdtemp(prefix="chat-assets-"))
    files = build_shapes(root, args.batch * (args.warmup + args.iters) * 2, args.shapes)
    print(f"teacher {param_count(root / 'teacher') / 1e6:.2f}M parameters, student "
          f"{param_count(root / 'student') / 1e6:.2f}M, vocabulary {VOCAB}, batch {args.batch}, "
          f"torch threads {args.threads}; median of {args.iters} steps after {args.warmup} warmup", flush=True)
    print("shapes: " + "; ".join(f"{n}: prompt {SHAPES[n][0][0]}-{SHAPES[n][0][1]}, completion "
                                  f"{SHAPES[n][1][0]}-{SHAPES[n][1][1]} tokens" for n in args.shapes), flush=True)
    rows = []
    for rnd in range(args.rounds):
        for shape in args.shapes:
            for method in args.methods:
                cfg = dict(root=str(root), data=files[shape], shape=shape, method=method, paths=args.paths,
                           batch=args.batch, warmup=args.warmup, iters=args.iters, threads=args.threads,
                           hpd_args=[a for a in args.hpd_args if "=" in a])
                r = {**launch("benchmarks.chat_vs_trl", cfg, timeout=args.timeout, env=child_env(args.threads)),
                     "round": rnd + 1, "shape": shape}
                rows.append(r)
                msg = r.get("error") or ", ".join(f"{p} {t * 1000:.1f} ms" for p, t in r["median_s"].items())
                print(f"round {rnd + 1} {shape} {method}: {msg} (load {r.get('load_avg_1min', float('nan')):.1f})",
                      file=sys.stderr, flush=True)
    print()
    print(report(rows, args))
    if args.hpd_args:
        print(f"\nhpd overrides: {' '.join(args.hpd_args)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
