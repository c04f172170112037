"""The hybrid sampling schedule: what each optimizer step trains on.

Per step the schedule decides three things, as a pure function of the step, the config,
the seed and (for the adaptive on-policy fraction only) the evaluations seen so far:

- the prefix source: student rollouts from the data's prompts with probability
  lambda(step), offline data otherwise. The coin for step t is drawn from an RNG seeded
  by (seed, t) alone, so every rank and every resumed run makes the same decisions.
  With `rollout_mix: rows` lambda is a share of each step's rows instead: every row
  has its own coin, keyed by (seed, t, the row's index in the data order), rollouts
  replace the rows whose coin falls below lambda, and the other rows keep their data,
  so the data token stays in every step;
- whether the per-position student sample is drawn (`sample`);
- the objective mix: weighted objectives, which may change in phases over training.

Step bounds (`ramp_start`, `ramp_end`, a phase's `until`) are written one way for all:
a value in [0, 1] is a fraction of the run's total steps (0.1 is 10% in, 1 is the end),
a value above 1 is an absolute optimizer step (a whole number, e.g. 500). A fraction f
becomes step round(f * total_steps), rounding halves up.

An objective is `method: weight`, or `method: {weight: w, <param>: value, ...}` when the
method takes parameters (weight defaults to 1). Parameters not given come from the
run's `method_params` when the method is the run's `method`, else from the method's
defaults. The temperature is set once for the run. Without `phases` the run trains
its `method` with weight 1.

Forward-KL warm-up for the first 10% of steps, then HPD on offline data::

    method: hpd
    schedule:
      phases:
        - until: 0.1
          objectives: {fkl: 1.0}
        - objectives: {hpd: 1.0}

GKD-style: the on-policy fraction ramps linearly from 0 to 0.5 between 10% and 60% of
training (constant before and after), HPD plus 0.1 x SFT, then JSD alone after step 2000::

    schedule:
      lambda_schedule: linear
      lambda_start: 0.0
      lambda_end: 0.5
      ramp_start: 0.1
      ramp_end: 0.6
      phases:
        - until: 2000
          objectives: {hpd: 1.0, sft: 0.1}
        - objectives: {jsd: {weight: 1.0, beta: 0.5}}

HPD's support kept while rollouts come in: the share of each step's rows replaced by
student rollouts ramps from 0 to 0.5 between 10% and 60% of training; the other rows stay
data rows, where HPD sees the data token beside the student's sample::

    method: hpd
    schedule:
      rollout_mix: rows
      lambda_schedule: linear
      lambda_start: 0.0
      lambda_end: 0.5
      ramp_start: 0.1
      ramp_end: 0.6

DistiLLM-style adaptive: start offline, and raise the on-policy fraction by 0.1 (up to
0.8) each time the held-out loss rises from one evaluation to the next (needs
`eval_data` and `eval_every`)::

    method: skew_rkl
    method_params: {alpha: 0.1}
    schedule:
      lambda_schedule: adaptive
      lambda_start: 0.0
      lambda_end: 0.8
      adaptive_step: 0.1
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hpd.objectives.rules import get_method
from hpd.train.schedule_config import (
    RAMPS,
    STATE_KEYS,
    Objective,
    ScheduleConfig,
    objective_of,
    parse_objectives,
    raise_all,
    to_step,
    total_steps_errors,
)


@dataclass(frozen=True)
class StepPlan:
    step: int
    lam: float  # the on-policy fraction at this step
    on_policy: bool  # prefixes from student rollouts this step (else offline data)
    sample: bool  # draw per-position student samples this step
    objectives: tuple[Objective, ...]
    phase: int = 0  # index of the active phase
    # rollout_mix rows: the share of rows replaced by rollouts (each row by its own coin:
    # `rollout_rows`); None: on an on-policy step every row is
    rollout_share: float | None = None

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "schedule/lambda": self.lam,
            "schedule/on_policy": int(self.on_policy),
            "schedule/sample": int(self.sample),
            "schedule/phase": self.phase,
        }
        if self.rollout_share is not None:
            metrics["schedule/rollout_share"] = self.rollout_share
        for obj in self.objectives:
            metrics[f"schedule/w/{obj.method}"] = obj.weight
        return metrics


class Schedule:
    """The per-step plans of one run; its only state is the adaptive lambda's history."""

    def __init__(self, config: ScheduleConfig, *, method: str, method_params: dict, total_steps: int, seed: int,
                 uld_weight: float = 0.0):
        config.validate()
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r}: must be an integer >= 1")
        raise_all(f"schedule does not fit a run of {total_steps} steps", total_steps_errors(config, total_steps))
        self.config, self.total_steps, self.seed = config, total_steps, seed
        self.phases = _build_phases(config.phases, method, dict(method_params), total_steps)
        if uld_weight > 0:  # --uld-weight: ULD's sorted distance joins every phase that lacks it
            self.phases = [(end, objs if any(o.method == "uld" for o in objs)
                            else (*objs, objective_of("uld", float(uld_weight), {})))
                           for end, objs in self.phases]
        self._last_eval_step: int | None = None
        self._last_eval_loss: float | None = None
        self._lambda_changes: list[tuple[int, float]] = []  # (eval step, lambda for the steps after it)

    def plan(self, step: int) -> StepPlan:
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        lam = self.lam(step)
        phase = self.phase_index(step)
        objectives = self.phases[phase][1]
        if self.config.rollout_mix == "rows":
            return StepPlan(step=step, lam=lam, on_policy=lam > 0, sample=self._sample(objectives),
                            objectives=objectives, phase=phase, rollout_share=lam)
        return StepPlan(step=step, lam=lam, on_policy=_coin(self.seed, step) < lam,
                        sample=self._sample(objectives), objectives=objectives, phase=phase)

    def rollout_rows(self, step: int, rows) -> list[bool]:
        """Which of `rows` (their indices in the data order) a step replaces by student rollouts:
        all on an on-policy step, or under `rollout_mix: rows` those whose own coin, keyed by
        (seed, step, row), falls below lambda; the same rows however a batch is split."""
        plan = self.plan(step)
        if not plan.on_policy:
            return [False] * len(rows)
        if plan.rollout_share is None:
            return [True] * len(rows)
        return [_coin(self.seed, f"{step}:{int(r)}") < plan.rollout_share for r in rows]

    def lam(self, step: int) -> float:
        c = self.config
        if c.lambda_schedule == "adaptive":
            return self._adaptive_lam(step)
        end = c.lambda_start if c.lambda_end is None else c.lambda_end
        return lambda_at(c.lambda_schedule, step, self.total_steps, start=c.lambda_start, end=end,
                         ramp_start=c.ramp_start, ramp_end=c.ramp_end)

    def phase_index(self, step: int) -> int:
        for i, (end, _) in enumerate(self.phases):
            if step < end:
                return i
        return len(self.phases) - 1

    def _sample(self, objectives: tuple[Objective, ...]) -> bool:
        if self.config.sample == "auto":
            return any(get_method(obj.method).needs_sample for obj in objectives)
        return self.config.sample == "always"

    # ------------------------------------------------------------------ adaptive lambda
    def _adaptive_lam(self, step: int) -> float:
        lam = float(self.config.lambda_start)
        for eval_step, value in self._lambda_changes:
            if eval_step < step:
                lam = value
        return lam

    def observe_eval(self, step: int, eval_loss: float) -> None:
        """The held-out loss after `step`; adaptive lambda rises, for later steps, when it rose.

        A loss equal to the previous one is not a rise; a non-finite loss is ignored.
        """
        if self._last_eval_step is not None and step <= self._last_eval_step:
            raise ValueError(f"observe_eval(step={step}) after step {self._last_eval_step}: steps must increase")
        if not math.isfinite(eval_loss):
            return
        rose = self._last_eval_loss is not None and eval_loss > self._last_eval_loss
        self._last_eval_step, self._last_eval_loss = step, float(eval_loss)
        c = self.config
        if rose and c.lambda_schedule == "adaptive":
            current = self._adaptive_lam(step + 1)
            raised = min(float(c.lambda_end), round(current + c.adaptive_step, 12))
            if raised > current:
                self._lambda_changes.append((step, raised))

    def state_dict(self) -> dict:
        return {
            "last_eval_step": self._last_eval_step,
            "last_eval_loss": self._last_eval_loss,
            "lambda_changes": [[s, v] for s, v in self._lambda_changes],
        }

    def load_state_dict(self, d: dict) -> None:
        if set(d) != set(STATE_KEYS):
            raise ValueError(f"schedule state has keys {sorted(d)}; expected {', '.join(STATE_KEYS)}")
        self._last_eval_step = d["last_eval_step"]
        self._last_eval_loss = d["last_eval_loss"]
        self._lambda_changes = [(int(s), float(v)) for s, v in d["lambda_changes"]]


def lambda_at(kind: str, step: int, total_steps: int, *, start: float, end: float,
              ramp_start: float, ramp_end: float) -> float:
    """The on-policy fraction at `step`: `start` until ramp_start, `end` from ramp_end on.

    Ramp bounds follow `to_step`. Adaptive lambda depends on evaluations: see `Schedule`.
    """
    if kind == "constant":
        return float(start)
    if kind not in RAMPS:
        raise ValueError(f"lambda_at: kind={kind!r}: allowed constant, linear, cosine "
                         "(adaptive lambda depends on evaluations; use Schedule)")
    first, last = to_step(ramp_start, total_steps), to_step(ramp_end, total_steps)
    if step < first:
        return float(start)
    if step >= last:
        return float(end)
    progress = (step - first) / (last - first)
    if kind == "cosine":  # (1 - cos(pi * progress)) / 2, written so the midpoint is exactly 1/2
        progress = 0.5 * (1.0 + math.sin(math.pi * (progress - 0.5)))
    return start + (end - start) * progress


def _coin(seed: int, step) -> float:
    """A uniform draw in [0, 1) that depends on (seed, step) only (a str seed is hashed with sha512);
    a row's coin passes "step:row" as `step`."""
    return random.Random(f"hpd.schedule:{seed}:{step}").random()


def _build_phases(phases: list, method: str, method_params: dict, total_steps: int):
    """[(end step, objectives)]; the last phase ends at total_steps. Raises on a bad objective."""
    if not phases:
        return [(total_steps, (objective_of(method, 1.0, method_params),))]
    inherited = {method: method_params}
    built, errors = [], []
    for i, phase in enumerate(phases):
        objectives, errs = parse_objectives(f"phases[{i}].objectives", phase["objectives"], inherited)
        errors += errs
        end = to_step(phase["until"], total_steps) if "until" in phase else total_steps
        built.append((end, objectives))
    raise_all("invalid schedule objectives", errors)
    return built


__all__ = ["StepPlan", "Schedule", "lambda_at"]
