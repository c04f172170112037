"""TRL's GKDTrainer on the sums models and data: the reference rows of benchmarks.evidence.

TRL is a benchmark-only dependency (`pip install trl`); nothing in hpd imports it. The
trainer runs as TRL ships it (its loss, its on-policy step, its Trainer loop). This module
supplies only what must match hpd's runs for the rows to be comparable:

- the same token ids: a collator that encodes rows with hpd.data.examples (bos + prompt +
  completion + eos, loss on the completion and eos), prompts left-padded as TRL's
  on-policy generation expects;
- the same optimizer and learning-rate curve: torch AdamW with hpd's defaults and hpd's
  warmup-then-cosine (transformers' own cosine runs its first step at learning rate 0);
- step times, losses, gradient norms and curve points from a callback, with the curve
  points' generation left out of the clock.

What differs by TRL's design (docs/evidence.md): the data order and the sampling draws
come from TRL's own seeded sampler and RNG, and on an on-policy step TRL divides the
summed loss by the target tokens of the data batch, counted before the batch is replaced
by the student's rollouts (hpd divides by the rollout's own tokens).

    python -m benchmarks.sums_trl      # hpd's jsd against TRL's generalized_jsd_loss, on random logits
"""

from __future__ import annotations

import time


def version() -> str:
    import trl

    return trl.__version__


def gkd_classes():
    """(GKDConfig, GKDTrainer) wherever this TRL keeps them (trl.experimental.gkd since 0.2x)."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def collator(tokenizer):
    import torch

    from hpd.data.examples import encode_row, pad_id_of

    pad = pad_id_of(tokenizer)

    def collate(rows):
        examples = [encode_row({"prompt": r["prompt"], "completion": r["completion"]}, tokenizer) for r in rows]
        width = max(len(e.input_ids) for e in examples)
        prompt_width = max(e.prompt_len for e in examples)
        n = len(examples)
        ids = torch.full((n, width), pad, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        prompts = torch.full((n, prompt_width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, prompt_width), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e.input_ids)
            ids[i, :k] = torch.tensor(e.input_ids)
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor([t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)])
            p = e.prompt_len
            prompts[i, prompt_width - p:] = torch.tensor(e.input_ids[:p])  # left-padded
            prompt_mask[i, prompt_width - p:] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "prompts": prompts, "prompt_attention_mask": prompt_mask}

    return collate


def run(*, student: str, teacher: str, rows: list, out: str, steps: int, lr: float, seed: int, batch_size: int,
        lmbda: float, beta: float, temperature: float, max_new_tokens: int, warmup_ratio: float,
        max_grad_norm: float, curve=None, eval_every: int = 0) -> dict:
    """One GKDTrainer run. `curve(model) -> accuracy` is called at step 0 and every `eval_every`
    steps. Returns the trained model, its tokenizer, per-step records shaped like hpd's
    metrics.jsonl (loss, grad_norm, seconds) and the curve points."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hpd.train.loop import learning_rate

    GKDConfig, GKDTrainer = gkd_classes()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(student)
    args = GKDConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=lr, max_grad_norm=max_grad_norm, logging_steps=1, save_strategy="no",
                     report_to=[], seed=seed, data_seed=seed, use_cpu=True, disable_tqdm=True,
                     dataloader_num_workers=0, lmbda=lmbda, beta=beta, temperature=temperature,
                     max_new_tokens=max_new_tokens, max_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(s, steps, 1.0, kind="cosine", warmup_ratio=warmup_ratio))

    records, evals = [], []
    clock = {"train": 0.0, "mark": None}

    def score(m):
        # SFTTrainer turns the KV cache off in the model's config; generation without it takes other
        # float paths, which flip a few greedy choices of a weak student. Score as hpd's runs are scored.
        cached, m.config.use_cache = m.config.use_cache, True
        try:
            return curve(m)
        finally:
            m.config.use_cache = cached

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if curve is not None:
                evals.append({"step": 0, "seconds": 0.0, "accuracy": score(kw["model"])})
            clock["mark"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock["train"] += time.perf_counter() - clock["mark"]
            records.append({"step": state.global_step, "seconds": clock["train"]})
            if curve is not None and eval_every and (state.global_step % eval_every == 0 or state.global_step == steps):
                m = kw["model"]
                m.eval()
                evals.append({"step": state.global_step, "seconds": clock["train"], "accuracy": score(m)})
                m.train()
            clock["mark"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and records:
                records[-1].update(loss=float(logs["loss"]), grad_norm=float(logs.get("grad_norm", float("nan"))))

    trainer = GKDTrainer(model=model, teacher_model=teacher_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, data_collator=collator(tok), optimizers=(optimizer, schedule),
                         callbacks=[Recorder()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # a line per step otherwise; the records keep them
    trainer.train()
    model.eval()
    model.config.use_cache = True  # the scores after training too
    return {"model": model, "tokenizer": tok, "records": records, "evals": evals}


def series(got: dict, on_policy: int) -> dict:
    """A run's series shaped like hpd's (benchmarks.sums_report.series) from `run`'s records and
    curve points; `on_policy` (TRL's lmbda, 0 or 1) marks every step."""
    records = got["records"]
    return {"steps": [r["step"] for r in records], "loss": [r.get("loss", float("nan")) for r in records],
            "grad_norm": [r.get("grad_norm", float("nan")) for r in records],
            "seconds": [r["seconds"] for r in records], "on_policy": [on_policy] * len(records), "tokens": [],
            "rollout_tokens": [], "diagnostics": {}, "evals": got["evals"]}


def loss_agreement(betas=(0.0, 0.1, 0.5, 0.9, 1.0), seed: int = 0) -> list:
    """hpd's jsd against TRL's generalized_jsd_loss on random logits with masked positions:
    (beta, largest loss difference, largest gradient difference) per beta. Both average over
    the unmasked positions; TRL's mixture is beta * teacher + (1 - beta) * student, as hpd's."""
    import torch

    import hpd

    _, GKDTrainer = gkd_classes()
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :2] = -100
    labels[2, 5:] = -100
    out = []
    for beta in betas:
        grads = []
        losses = []
        for which in ("hpd", "trl"):
            s = student.clone().requires_grad_(True)
            if which == "hpd":
                value, _ = hpd.loss("jsd", s, teacher, labels, beta=beta)
            else:
                value = GKDTrainer.generalized_jsd_loss(s, teacher, labels=labels, beta=beta)
            value.backward()
            losses.append(float(value.detach()))
            grads.append(s.grad)
        out.append((beta, abs(losses[0] - losses[1]), float((grads[0] - grads[1]).abs().max())))
    return out


if __name__ == "__main__":
    print(f"TRL {version()}: hpd.loss('jsd') against GKDTrainer.generalized_jsd_loss (float64, 3 x 7 positions, "
          "5 masked, vocabulary 50)")
    for beta, dl, dg in loss_agreement():
        print(f"beta {beta:.1f}: |loss difference| {dl:.2e}, largest |gradient difference| {dg:.2e}")
