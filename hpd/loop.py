"""The training loop, written once for every backend.

batch -> teacher forward -> student forward/backward through the step's objectives ->
optimizer step -> metrics -> checkpoint. The loop talks to a backend only through
`hpd.backend.Backend`; the run's set-up and export live in `hpd.run`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import hpd
from hpd.backend import Backend, Outputs
from hpd.chunked import DEFAULT_CHUNK_BUDGET_MB
from hpd.data import IGNORE_INDEX, Batches
from hpd.teacher import LiveTeacher, LogitsTeacher


def learning_rate(step: int, total: int, peak: float, *, kind: str = "cosine",
                  warmup_ratio: float = 0.0, min_ratio: float = 0.0) -> float:
    """Linear warmup to `peak`, then cosine, linear or constant decay to `min_ratio * peak`.
    `step` counts from 0; the first step never runs at learning rate 0."""
    warmup = int(round(warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if kind == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))  # the last step stays above the floor
    floor = min_ratio * peak
    if kind == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def target_count(targets: np.ndarray, vocab: int) -> int:
    return int(((targets != IGNORE_INDEX) & (targets >= 0) & (targets < vocab)).sum())


def objective_loss_fn(objectives, teacher, targets, *, sampled, num_tokens: float, temperature: float,
                      chunk_size, chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB, uniforms=None):
    """loss_fn(student_out) for the step's weighted objectives, averaged over num_tokens.

    `teacher`: the teacher model's `Outputs` for the batch, or any `TeacherSource`."""
    source = teacher_source_of(teacher)

    def loss_fn(student_out: Outputs):
        total, metrics = None, {}
        for obj in objectives:
            common = dict(sampled=sampled, uniforms=uniforms, num_tokens=num_tokens, temperature=temperature,
                          **obj.params)
            if student_out.logits is not None:
                value, m = hpd.loss(obj.method, student_out.logits, source, targets, **common)
            else:
                value, m = hpd.chunked_loss(obj.method, student_out.hidden, student_out.head, targets=targets,
                                            teacher=source, chunk_size=chunk_size,
                                            chunk_budget_mb=chunk_budget_mb, **common)
            term = value * obj.weight if obj.weight != 1.0 else value
            total = term if total is None else total + term
            if len(objectives) > 1:
                m = {(k if "/" in k else f"{obj.method}/{k}"): v for k, v in m.items()}
            metrics.update(m)
        return total, metrics

    return loss_fn


def teacher_source_of(teacher):
    """A TeacherSource from the teacher model's Outputs (hidden states and head, or
    logits), or the source itself."""
    if isinstance(teacher, Outputs):
        return LiveTeacher(teacher.hidden, teacher.head) if teacher.logits is None else LogitsTeacher(teacher.logits)
    return teacher


def live_teacher(loop: "Loop", micro_batch: dict, arrays: dict, plan):
    """The default teacher of a step: the teacher model's forward on the batch."""
    return loop.backend.forward(loop.teacher, arrays, hidden=loop.chunked)


@dataclass
class MetricMeans:
    """Token-weighted means of per-micro-batch metrics (min/max kept as such)."""

    sums: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        for k, v in metrics.items():
            if k.endswith("tokens"):
                self.sums[k] = self.sums.get(k, 0.0) + v
            elif k.endswith("_min"):
                self.sums[k] = min(self.sums.get(k, v), v)
            elif k.endswith("_max"):
                self.sums[k] = max(self.sums.get(k, v), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * tokens
        self.weight += tokens

    def result(self) -> dict[str, float]:
        w = max(self.weight, 1.0)
        return {k: (v if k.endswith(("tokens", "_min", "_max")) else v / w) for k, v in self.sums.items()}


@dataclass
class LoopState:
    step: int = 0
    bad_steps: int = 0  # consecutive non-finite losses
    skipped_steps: int = 0  # all non-finite losses so far

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Loop:
    """Everything one run's steps need; `run()` performs them."""

    backend: Backend
    config: Any  # hpd.config.DistillConfig
    student: Any
    teacher: Any
    tokenizer: Any
    optimizer: Any
    batches: Batches
    schedule: Any  # hpd.schedule.Schedule
    total_steps: int
    vocab: int
    chunked: bool = False
    state: LoopState = field(default_factory=LoopState)
    eval_batches: list | None = None
    log: Callable[[dict], None] = lambda record: None
    save: Callable[["Loop"], None] = lambda loop: None
    # tests inject samples that do not depend on the batch split: batch -> (B, T) ids
    given_samples: Callable[[dict], np.ndarray] | None = None
    rollout: Callable[["Loop", Any, dict], dict] | None = None
    # where a step's teacher log-probs come from: (loop, micro-batch, arrays, plan) ->
    # the teacher's Outputs or a TeacherSource (an offline store, say)
    teacher_source: Callable[["Loop", dict, dict, Any], Any] = live_teacher

    def run(self, progress=None) -> dict[str, float]:
        cfg = self.config
        last: dict[str, float] = {}
        while self.state.step < self.total_steps:
            step = self.state.step
            plan = self.schedule.plan(step)
            record = self.train_step(plan)
            if record is None:  # non-finite loss, step skipped
                continue
            last = record
            if cfg.eval_every and self.eval_batches and (step + 1) % cfg.eval_every == 0 \
                    and step + 1 < self.total_steps:
                record.update(self.evaluate())
                self.schedule.observe_eval(step, record["eval/loss"])
            if self.backend.rank == 0:
                self.log(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if cfg.save_every and self.state.step % cfg.save_every == 0 and self.state.step < self.total_steps:
                self.save(self)
        return last

    def train_step(self, plan) -> dict[str, float] | None:
        cfg, backend = self.config, self.backend
        step = self.state.step
        micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        extra: dict[str, float] = {}
        if plan.on_policy and self.rollout is not None:
            micro, extra = self._rollouts(micro)
        started = time.perf_counter()  # training throughput excludes generation (logged as rollout/*)
        local = sum(target_count(mb["targets"], self.vocab) for mb in micro)
        global_tokens = backend.all_reduce_sum(float(local))
        means, loss_total = MetricMeans(), 0.0
        for mb in micro:
            arrays = backend.to_arrays(mb)
            sampled = None
            if self.given_samples is not None:
                sampled = backend.to_arrays({"s": self.given_samples(mb)})["s"]
            elif not plan.sample:  # no student sample this step: s = y leaves only the data token
                t = mb["targets"]
                sampled = backend.to_arrays({"s": np.where((t >= 0) & (t < self.vocab), t, 0)})["s"]
            teacher = self.teacher_source(self, mb, arrays, plan)
            loss_fn = objective_loss_fn(plan.objectives, teacher, arrays["targets"], sampled=sampled,
                                        num_tokens=max(global_tokens, 1.0), temperature=cfg.temperature,
                                        chunk_size=cfg.chunk_size, chunk_budget_mb=cfg.chunk_budget_mb)
            value, metrics = backend.forward_backward(self.student, arrays, loss_fn, hidden=self.chunked)
            loss_total += value
            means.add(metrics, target_count(mb["targets"], self.vocab))
        loss_total = backend.all_reduce_sum(loss_total)
        if not math.isfinite(loss_total):
            return self._skip(step, loss_total)
        self.state.bad_steps = 0
        lr = learning_rate(step, self.total_steps, cfg.lr, kind=cfg.lr_schedule,
                           warmup_ratio=cfg.warmup_ratio, min_ratio=cfg.min_lr_ratio)
        grad_norm = backend.optimizer_step(self.student, self.optimizer, lr, cfg.max_grad_norm)
        elapsed = time.perf_counter() - started
        self.state.step += 1
        record = {"step": self.state.step, "loss": loss_total, "lr": lr, "tokens": int(global_tokens),
                  "tokens_per_s": global_tokens / max(elapsed, 1e-9), "grad_norm": grad_norm,
                  "epoch": self.batches.epoch, "skipped_steps": self.state.skipped_steps}
        record.update({k: v for k, v in means.result().items() if k != "tokens"})
        record.update(plan.as_metrics())
        record.update(extra)
        return record

    def _skip(self, step: int, loss_value: float):
        self.backend.zero_grad(self.student, self.optimizer)
        self.state.bad_steps += 1
        self.state.skipped_steps += 1
        if self.backend.rank == 0:
            self.log({"step": step + 1, "skipped": 1, "loss": str(loss_value),
                      "skipped_steps": self.state.skipped_steps})
        if self.state.bad_steps >= self.config.max_bad_steps:
            self.save(self)
            raise NonFiniteLoss(
                f"{self.state.bad_steps} consecutive steps had a non-finite loss ({loss_value}) at step "
                f"{step + 1}; the last good state is saved in checkpoints/step-{self.state.step}. "
                "Lower --lr, check the data, or use --dtype float32."
            )
        # the data moved on: the step is retried on the next batch
        return None

    def _rollouts(self, micro):
        started = time.perf_counter()
        out, generated, rows = [], 0, 0
        for mb in micro:
            new = self.rollout(self, self.student, mb)
            generated += int(new.pop("generated_tokens", 0))
            rows += len(new["input_ids"])
            out.append(new)
        seconds = time.perf_counter() - started
        return out, {"rollout/tokens": generated, "rollout/tokens_per_s": generated / max(seconds, 1e-9),
                     "rollout/mean_length": generated / max(rows, 1), "rollout/seconds": seconds}

    def evaluate(self) -> dict[str, float]:
        """Held-out student NLL and token-level KL(teacher || student)."""
        backend, means = self.backend, MetricMeans()
        for mb in self.eval_batches or []:
            arrays = backend.to_arrays(mb)
            t_out = backend.forward(self.teacher, arrays)
            s_out = backend.forward(self.student, arrays)
            _, m = hpd.loss("fkl", s_out.logits, t_out.logits, arrays["targets"], temperature=1.0)
            means.add(m, m["tokens"])
        r = means.result()
        out = {"eval/loss": r.get("nll", float("nan")), "eval/kl": r.get("fkl", float("nan")),
               "eval/tokens": r.get("tokens", 0.0)}
        if self.config.eval_generate:
            from hpd.evaluate import accuracy

            acc = accuracy(backend, self.student, self.tokenizer, self.config.eval_data,
                           extractor=self.config.eval_extractor, limit=self.config.eval_generate,
                           max_new_tokens=self.config.rollout_max_new_tokens, progress=False)
            out["eval/accuracy"] = acc["accuracy"]
        return out
