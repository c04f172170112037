"""The training loop, written once for every backend.

batch -> teacher forward -> student forward/backward through the step's objectives ->
optimizer step -> metrics -> checkpoint. The loop talks to a backend only through
`hpd.models.backend.Backend`; the run's set-up and export live in `hpd.train.run`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpd.data.batches import Batches
from hpd.data.examples import IGNORE_INDEX
from hpd.models.backend import Backend, Outputs
from hpd.objectives.chunked import DEFAULT_CHUNK_BUDGET_MB, chunked_loss, resolve_chunk_budget
from hpd.objectives.losses import loss, metric_names, weighted_objectives
from hpd.objectives.uniforms import batch_uniforms, has_row_keys
from hpd.report.evaluate import MetricMeans
from hpd.teachers.live import live_teacher, teacher_source_of


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
                      chunk_size, chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB, uniforms=None, chunk_fn=None):
    """loss_fn(student_out) for the step's weighted objectives, averaged over num_tokens.

    `teacher`: the teacher model's `Outputs` for the batch, or any `TeacherSource`."""
    return ObjectiveLoss(tuple(objectives), teacher_source_of(teacher), targets, sampled=sampled,
                         uniforms=uniforms, num_tokens=num_tokens, temperature=temperature,
                         chunk_size=chunk_size, chunk_budget_mb=chunk_budget_mb, chunk_fn=chunk_fn)


@dataclass
class ObjectiveLoss:
    """A step's loss as a callable on the student's Outputs, with its inputs in view, so
    that a backend can also run it as a compiled function of those inputs
    (hpd.backends.mlx.compiled)."""

    objectives: tuple  # hpd.train.schedule.Objective: method, weight, params
    teacher: Any  # a TeacherSource
    targets: Any
    sampled: Any = None
    uniforms: Any = None
    num_tokens: float = 1.0
    temperature: float = 1.0
    chunk_size: Any = "auto"
    chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB
    chunk_fn: Any = None  # the backend's per-chunk function (Backend.chunk_fn)

    def release(self) -> None:
        """Drop the teacher's outputs once the loss is formed (a backend whose backward
        does not need them calls this; the fused chunked loss keeps only gradients)."""
        self.teacher = None

    def __call__(self, student_out: Outputs):
        groups, names = routing(self.teacher)
        common = dict(sampled=self.sampled, uniforms=self.uniforms, num_tokens=self.num_tokens,
                      temperature=self.temperature, groups=groups)

        def term(obj):
            if student_out.logits is not None:
                return loss(obj.method, student_out.logits, self.teacher, self.targets, **common, **obj.params)
            return chunked_loss(obj.method, student_out.hidden, student_out.head, targets=self.targets,
                                teacher=self.teacher, chunk_size=self.chunk_size,
                                chunk_budget_mb=self.chunk_budget_mb, chunk_fn=self.chunk_fn, **common,
                                **obj.params)

        total, found = weighted_objectives(self.objectives, term)
        metrics = {}
        for obj, m in zip(self.objectives, found):
            metrics.update(metric_names(m, obj.method, len(self.objectives)))
        if names:
            metrics.update(per_group([obj.weight for obj in self.objectives], found, names))
        report = getattr(self.teacher, "metrics", None)  # a source's own figures (hpd.teachers.cross)
        if report is not None:
            metrics.update(report())
        return total, metrics


def routing(source) -> tuple[tuple | None, list]:
    """The `groups` argument of the loss and the teachers' names, where a source over the rows
    of several teachers names each position's (hpd.teachers.routed): the metrics are then
    also reported per teacher. (None, []) for one teacher."""
    routed = getattr(source, "groups", None)
    return (None, []) if routed is None else ((routed[0], len(routed[1])), list(routed[1]))


def per_group(weights, found: list[dict], names) -> dict[str, float]:
    """teacher/<name>/loss (the objectives' sum, by `weights`, over that teacher's positions),
    /kl and /tokens, from each objective's group/<g>/... metrics (`found`, one per objective)."""
    out = {}
    for g, name in enumerate(names):
        key = f"group/{g}"
        out[f"teacher/{name}/tokens"] = found[0][f"{key}/tokens"]
        out[f"teacher/{name}/kl"] = found[0][f"{key}/kl"]
        out[f"teacher/{name}/loss"] = sum(w * m[f"{key}/objective"] for w, m in zip(weights, found))
    return out


@dataclass
class LoopState:
    step: int = 0
    bad_steps: int = 0  # consecutive steps with a non-finite loss or gradient norm
    skipped_steps: int = 0  # all such steps so far

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class NonFiniteLoss(RuntimeError):
    pass


def finite_or_none(value: float) -> float | None:
    """A metrics.jsonl value: the number, or None (JSON null) for NaN and infinities, which
    JSON cannot hold (runs before this wrote them as the strings "nan", "inf")."""
    return value if math.isfinite(value) else None


@dataclass
class Loop:
    """Everything one run's steps need; `run()` performs them."""

    backend: Backend
    config: Any  # hpd.train.config.DistillConfig
    student: Any
    teacher: Any
    tokenizer: Any
    optimizer: Any
    batches: Batches
    schedule: Any  # hpd.train.schedule.Schedule
    total_steps: int
    vocab: int
    chunked: bool = False
    state: LoopState = field(default_factory=LoopState)
    eval_batches: list | None = None
    # held-out KL to the teacher (None: when `teacher` is set; a store alone cannot score them)
    eval_kl: bool | None = None
    log: Callable[[dict], None] = lambda record: None
    save: Callable[[Loop], None] = lambda loop: None
    # tests inject samples that do not depend on the batch split: batch -> (B, T) ids
    given_samples: Callable[[dict], np.ndarray] | None = None
    rollout: Callable[[Loop, Any, dict], dict] | None = None
    # where a step's teacher log-probs come from: (loop, micro-batch, arrays, plan) ->
    # the teacher's Outputs or a TeacherSource (an offline store, a teacher of another
    # tokenizer); evaluation asks it too, with plan None
    teacher_source: Callable[[Loop, dict, dict, Any], Any] = live_teacher
    # asked before each step: True ends run() there (a signal asked the run to stop)
    should_stop: Callable[[], bool] = lambda: False

    @property
    def chunk_budget_mb(self) -> float:
        """--chunk-budget-mb, its default resolved for where the student runs."""
        return resolve_chunk_budget(self.config.chunk_budget_mb, self.backend.device_type == "cuda")

    def run(self) -> dict[str, float]:
        cfg = self.config
        last: dict[str, float] = {}
        while self.state.step < self.total_steps:
            if self.should_stop():
                break
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
            if cfg.save_every and self.state.step % cfg.save_every == 0 and self.state.step < self.total_steps:
                self.save(self)
        return last

    def train_step(self, plan) -> dict[str, float] | None:
        cfg, backend = self.config, self.backend
        step = self.state.step
        position = self.batches.state_dict()
        micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        extra: dict[str, float] = {}
        if plan.on_policy and self.rollout is not None:
            try:
                micro, extra = self._rollouts(micro)
            except BaseException:  # the step never happened: a checkpoint taken now resumes with its batches
                self.batches.load_state_dict(position)
                raise
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
            # the student's samples follow uniforms keyed by (seed, step, global row, position):
            # the same draws however the batch is split over processes and micro-batches
            uniforms = batch_uniforms(cfg.seed, step, mb) if sampled is None and has_row_keys(mb) else None
            teacher = self.teacher_source(self, mb, arrays, plan)
            loss_fn = objective_loss_fn(plan.objectives, teacher, arrays["targets"], sampled=sampled,
                                        num_tokens=max(global_tokens, 1.0), temperature=cfg.temperature,
                                        chunk_size=cfg.chunk_size, chunk_budget_mb=self.chunk_budget_mb,
                                        uniforms=uniforms, chunk_fn=backend.chunk_fn)
            del teacher  # loss_fn holds it, and may release it before the backward
            value, metrics = backend.forward_backward(self.student, arrays, loss_fn, hidden=self.chunked)
            loss_total += value
            means.add(metrics, target_count(mb["targets"], self.vocab))
        loss_total = backend.all_reduce_sum(loss_total)
        if not math.isfinite(loss_total):
            return self._skip(step, loss_total)
        lr = learning_rate(step, self.total_steps, cfg.lr, kind=cfg.lr_schedule,
                           warmup_ratio=cfg.warmup_ratio, min_ratio=cfg.min_lr_ratio)
        grad_norm = backend.optimizer_step(self.student, self.optimizer, lr, cfg.max_grad_norm)
        if not math.isfinite(grad_norm):  # not applied by the backend; skipped like a NaN loss
            return self._skip(step, loss_total, grad_norm)
        self.state.bad_steps = 0
        elapsed = time.perf_counter() - started
        self.state.step += 1
        record = {"step": self.state.step, "loss": loss_total, "lr": lr, "tokens": int(global_tokens),
                  "tokens_per_s": global_tokens / max(elapsed, 1e-9), "grad_norm": grad_norm,
                  "epoch": self.batches.epoch, "skipped_steps": self.state.skipped_steps}
        record.update({k: v for k, v in means.result().items() if k != "tokens"})
        record.update(plan.as_metrics())
        record.update(extra)
        record.update(backend.step_metrics())  # e.g. torch.compile's graph count
        return record

    def _skip(self, step: int, loss_value: float, grad_norm: float | None = None):
        self.backend.zero_grad(self.student, self.optimizer)
        self.state.bad_steps += 1
        self.state.skipped_steps += 1
        what = f"loss ({loss_value})" if grad_norm is None else f"gradient norm ({grad_norm})"
        if self.backend.rank == 0:  # JSON numbers, or null where the value is not finite
            record = {"step": step + 1, "skipped": True, "loss": finite_or_none(loss_value),
                      "skipped_steps": self.state.skipped_steps}
            if grad_norm is not None:
                record["grad_norm"] = finite_or_none(grad_norm)
            self.log(record)
        if self.state.bad_steps >= self.config.max_bad_steps:
            self.save(self)
            raise NonFiniteLoss(
                f"{self.state.bad_steps} consecutive steps had a non-finite {what} at step "
                f"{step + 1}; the last good state is saved in checkpoints/step-{self.state.step}. "
                "Lower --lr, check the data, or use --dtype float32."
            )
        # the data moved on: the step is retried on the next batch
        return None

    def _rollouts(self, micro):
        """The micro-batches' rollouts and the step's rollout/* metrics: the hook's own
        (hpd.train.rollout.Rollouts: the engine's name, the seconds spent loading weights
        into it) summed over micro-batches, tokens/s over the generating time alone."""
        started = time.perf_counter()
        out, generated, rows, metrics = [], 0, 0, {}
        for mb in micro:
            new = self.rollout(self, self.student, mb)
            generated += int(new.pop("generated_tokens", 0))
            for key, value in new.pop("rollout_metrics", {}).items():
                metrics[key] = metrics.get(key, 0) + value if isinstance(value, (int, float)) else value
            rows += int(new.pop("generated_rows", len(new["input_ids"])))
            out.append(new)
        seconds = time.perf_counter() - started
        generating = seconds - metrics.get("rollout/sync_s", 0.0)
        return out, {"rollout/tokens": generated, "rollout/tokens_per_s": generated / max(generating, 1e-9),
                     "rollout/mean_length": generated / max(rows, 1), "rollout/seconds": seconds, **metrics}

    def evaluate(self) -> dict[str, float]:
        """Held-out student NLL and token-level KL(teacher || student)."""
        backend, means = self.backend, MetricMeans()
        with_kl = self.teacher is not None if self.eval_kl is None else self.eval_kl
        for mb in self.eval_batches or []:
            arrays = backend.to_arrays(mb)
            s_out = backend.forward(self.student, arrays)
            if not with_kl:  # trained from a teacher store: no teacher to compare with
                _, m = loss("sft", s_out.logits, s_out.logits, arrays["targets"])
            else:  # the same source as training (a teacher of another tokenizer reads its own tokens)
                teacher = teacher_source_of(self.teacher_source(self, mb, arrays, None))
                groups, names = routing(teacher)  # per-teacher KL where rows name theirs
                _, m = loss("fkl", s_out.logits, teacher, arrays["targets"], temperature=1.0, groups=groups)
                if names:
                    m.update(per_group([1.0], [m], names))
            means.add(m, m["tokens"])
        r = means.result()
        out = {"eval/loss": r.get("nll", float("nan")), "eval/tokens": r.get("tokens", 0.0)}
        if with_kl:
            out["eval/kl"] = r.get("fkl", float("nan"))
            out.update({f"eval/{k}": v for k, v in r.items() if k.startswith("teacher/") and k.endswith("/kl")})
        if self.config.eval_generate:
            from hpd.report.evaluate import accuracy, eval_source

            acc = accuracy(backend, self.student, self.tokenizer, self.config.eval_data,
                           extractor=self.config.eval_extractor, limit=self.config.eval_generate,
                           max_new_tokens=self.config.rollout_max_new_tokens, progress=False,
                           **eval_source(self.config))
            out["eval/accuracy"] = acc["accuracy"]
        return out
