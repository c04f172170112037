"""The hybrid sampling schedule: what each optimizer step trains on.

Per step the schedule decides three things, as a pure function of the step, the config,
the seed and (for the adaptive on-policy fraction only) the evaluations seen so far:

- the prefix source: student rollouts from the data's prompts with probability
  lambda(step), offline data otherwise. The coin for step t is drawn from an RNG seeded
  by (seed, t) alone, so every rank and every resumed run makes the same decisions;
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

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

from hpd.objectives.rules import get_method, resolve_params

LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "adaptive")
RAMPS = ("linear", "cosine")
SAMPLE_MODES = ("auto", "always", "never")
PHASE_KEYS = ("until", "objectives")
STATE_KEYS = ("last_eval_step", "last_eval_loss", "lambda_changes")


def _f(default, help: str):
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ScheduleConfig:
    lambda_schedule: str = _f("constant", "how the on-policy fraction lambda moves: constant, linear or cosine "
                                          "(ramps over [ramp_start, ramp_end]), adaptive (rises on eval loss)")
    lambda_start: float = _f(0.0, "on-policy fraction at the start, in [0, 1] (the value throughout, if constant)")
    lambda_end: float | None = _f(None, "on-policy fraction from ramp_end on (linear, cosine) or the ceiling "
                                        "(adaptive), in [0, 1]; leave unset for constant")
    ramp_start: float = _f(0.0, "where the ramp begins: a fraction of total steps in [0, 1] or a step > 1")
    ramp_end: float = _f(1.0, "where the ramp reaches lambda_end: a fraction of total steps in [0, 1] or a step > 1")
    adaptive_step: float = _f(0.1, "adaptive: rise of lambda each time the held-out loss rises, in (0, 1]")
    sample: str = _f("auto", "draw the per-position student sample: auto (when an active objective needs "
                             "one, e.g. hpd), always, never")
    phases: list = _f([], "objective mix over training: a list of {until, objectives}; the last phase has "
                          "no until and runs to the end; empty: the run's method with weight 1")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ScheduleConfig":
        """The `schedule:` section of a recipe, validated."""
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown schedule key(s): {', '.join(unknown)}; known keys: {', '.join(cls.field_names())}"
            )
        defaults = cls()
        values = {k: (getattr(defaults, k) if v is None else v) for k, v in d.items()}
        return cls(**values).validate()

    def validate(self) -> "ScheduleConfig":
        """Raise one ValueError listing every problem."""
        errors = [
            *_check_choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES),
            *_check_choice("sample", self.sample, SAMPLE_MODES),
            *_check_fraction("lambda_start", self.lambda_start),
            *self._lambda_end_errors(),
            *_check_bound("ramp_start", self.ramp_start),
            *_check_bound("ramp_end", self.ramp_end),
            *_check_adaptive_step(self.adaptive_step),
            *_check_phases(self.phases),
        ]
        if self.lambda_schedule in RAMPS and not errors:
            errors += _ramp_order_errors(self.ramp_start, self.ramp_end, total_steps=None)
        _raise_all("invalid schedule config", errors)
        return self

    def _lambda_end_errors(self) -> list[str]:
        kind, start, end = self.lambda_schedule, self.lambda_start, self.lambda_end
        if end is None:
            if kind in (*RAMPS, "adaptive"):
                return [f"lambda_end is required when lambda_schedule={kind} (a fraction in [0, 1])"]
            return []
        errors = _check_fraction("lambda_end", end)
        if errors or not _is_number(start):
            return errors
        if kind == "constant" and end != start:
            return [f"lambda_end={end}: lambda_schedule=constant keeps lambda_start={start} throughout; "
                    "remove lambda_end or choose linear, cosine or adaptive"]
        if kind == "adaptive" and end < start:
            return [f"lambda_end={end}: adaptive lambda only rises, so lambda_end must be >= lambda_start={start}"]
        return []


@dataclass(frozen=True)
class Objective:
    method: str
    weight: float
    params: dict  # the method's parameters, defaults filled in (e.g. {"beta": 0.5} for jsd)


@dataclass(frozen=True)
class StepPlan:
    step: int
    lam: float  # the on-policy fraction at this step
    on_policy: bool  # prefixes from student rollouts this step (else offline data)
    sample: bool  # draw per-position student samples this step
    objectives: tuple[Objective, ...]
    phase: int = 0  # index of the active phase

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "schedule/lambda": self.lam,
            "schedule/on_policy": int(self.on_policy),
            "schedule/sample": int(self.sample),
            "schedule/phase": self.phase,
        }
        for obj in self.objectives:
            metrics[f"schedule/w/{obj.method}"] = obj.weight
        return metrics


class Schedule:
    """The per-step plans of one run; its only state is the adaptive lambda's history."""

    def __init__(self, config: ScheduleConfig, *, method: str, method_params: dict, total_steps: int, seed: int):
        config.validate()
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r}: must be an integer >= 1")
        _raise_all(f"schedule does not fit a run of {total_steps} steps", _total_steps_errors(config, total_steps))
        self.config, self.total_steps, self.seed = config, total_steps, seed
        self.phases = _build_phases(config.phases, method, dict(method_params), total_steps)
        self._last_eval_step: int | None = None
        self._last_eval_loss: float | None = None
        self._lambda_changes: list[tuple[int, float]] = []  # (eval step, lambda for the steps after it)

    def plan(self, step: int) -> StepPlan:
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        lam = self.lam(step)
        phase = self.phase_index(step)
        objectives = self.phases[phase][1]
        return StepPlan(step=step, lam=lam, on_policy=_coin(self.seed, step) < lam,
                        sample=self._sample(objectives), objectives=objectives, phase=phase)

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


# ---------------------------------------------------------------------- pure functions
def to_step(bound: float, total_steps: int) -> int:
    """A step bound as an optimizer step: [0, 1] is a fraction of total_steps, above 1 a step."""
    if bound <= 1:
        return math.floor(bound * total_steps + 0.5)
    return int(bound)


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


def _coin(seed: int, step: int) -> float:
    """A uniform draw in [0, 1) that depends on (seed, step) only (a str seed is hashed with sha512)."""
    return random.Random(f"hpd.train.schedule:{seed}:{step}").random()


def _build_phases(phases: list, method: str, method_params: dict, total_steps: int):
    """[(end step, objectives)]; the last phase ends at total_steps. Raises on a bad objective."""
    if not phases:
        return [(total_steps, (_objective(method, 1.0, method_params),))]
    inherited = {method: method_params}
    built, errors = [], []
    for i, phase in enumerate(phases):
        objectives, errs = _parse_objectives(f"phases[{i}].objectives", phase["objectives"], inherited)
        errors += errs
        end = to_step(phase["until"], total_steps) if "until" in phase else total_steps
        built.append((end, objectives))
    _raise_all("invalid schedule objectives", errors)
    return built


def _parse_objectives(where: str, spec, inherited: dict) -> tuple[tuple[Objective, ...], list[str]]:
    """`{method: weight}` or `{method: {weight, **params}}` as Objectives, with the errors found."""
    if not isinstance(spec, dict) or not spec:
        return (), [f"{where}: expected a non-empty mapping method -> weight (or -> {{weight, params}}), "
                    f"got {spec!r}"]
    objectives, errors = [], []
    for name, value in spec.items():
        try:
            objectives.append(_objective(name, value, inherited.get(name, {})))
        except (TypeError, ValueError) as e:
            errors.append(f"{where}.{name}: {e}")
    return tuple(objectives), errors


def _objective(name: str, value, inherited: dict) -> Objective:
    method = get_method(name)
    if isinstance(value, dict):
        params = dict(value)
        weight = params.pop("weight", 1.0)
    else:
        params, weight = {}, value
    if not _is_number(weight) or not (0 < weight < math.inf):
        raise ValueError(f"weight={weight!r}: must be a number > 0 (leave the method out instead of 0)")
    if "temperature" in params:
        raise ValueError("temperature is set once for the run (the top-level `temperature`), not per objective")
    return Objective(name, float(weight), resolve_params(method, {**inherited, **params}))


# ---------------------------------------------------------------------- checks
def _raise_all(header: str, errors: list[str]) -> None:
    # indented so that the list nests under DistillConfig's own list of errors
    if errors:
        raise ValueError(f"{header}:\n    - " + "\n    - ".join(errors))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _check_choice(name: str, value, choices: tuple) -> list[str]:
    return [] if value in choices else [f"{name}={value!r}: allowed {', '.join(choices)}"]


def _check_fraction(name: str, value) -> list[str]:
    return [] if _is_number(value) and 0 <= value <= 1 else [f"{name}={value!r}: must be a number in [0, 1]"]


def _check_adaptive_step(value) -> list[str]:
    return [] if _is_number(value) and 0 < value <= 1 else [f"adaptive_step={value!r}: must be a number in (0, 1]"]


def _check_bound(name: str, value) -> list[str]:
    if _is_number(value) and 0 <= value < math.inf and (value <= 1 or value == int(value)):
        return []
    return [f"{name}={value!r}: must be a fraction of total steps in [0, 1] or a whole step number > 1"]


def _same_kind(a: float, b: float) -> bool:
    return (a <= 1) == (b <= 1)


def _ramp_order_errors(ramp_start, ramp_end, total_steps: int | None) -> list[str]:
    """Without total_steps only bounds of the same kind (both fractions or both steps) compare."""
    if total_steps is None:
        if not _same_kind(ramp_start, ramp_end):
            return []
        first, last = ramp_start, ramp_end
    else:
        first, last = to_step(ramp_start, total_steps), to_step(ramp_end, total_steps)
    if first > last:
        return [f"ramp_start={ramp_start} comes after ramp_end={ramp_end}"]
    return []


def _check_phases(phases) -> list[str]:
    if not isinstance(phases, list):
        return [f"phases: expected a list of {{until, objectives}} mappings, got {phases!r}"]
    errors = []
    for i, phase in enumerate(phases):
        where, last = f"phases[{i}]", i == len(phases) - 1
        if not isinstance(phase, dict):
            errors.append(f"{where}: expected a mapping with keys {', '.join(PHASE_KEYS)}, got {phase!r}")
            continue
        unknown = sorted(set(phase) - set(PHASE_KEYS))
        if unknown:
            errors.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known keys: "
                          f"{', '.join(PHASE_KEYS)}")
        if last and "until" in phase:
            errors.append(f"{where}.until: the last phase runs to the end of training; remove its until")
        elif not last and "until" not in phase:
            errors.append(f"{where}.until is required: every phase but the last ends at a step")
        elif not last:
            errors += _check_bound(f"{where}.until", phase["until"])
        if "objectives" not in phase:
            errors.append(f"{where}.objectives is required, e.g. {{hpd: 1.0}}")
        else:
            errors += _parse_objectives(f"{where}.objectives", phase["objectives"], {})[1]
    if not errors:
        errors += _phase_order_errors(phases, total_steps=None)
    return errors


def _phase_order_errors(phases: list, total_steps: int | None) -> list[str]:
    """Phase ends must increase (and, with total_steps, lie strictly inside the run)."""
    untils = [(i, p["until"]) for i, p in enumerate(phases[:-1])]
    errors = []
    if total_steps is not None and untils:
        i, until = untils[0]
        if to_step(until, total_steps) <= 0:
            errors.append(f"phases[{i}].until={until} is step 0 of {total_steps}: the phase would never run")
        i, until = untils[-1]
        if to_step(until, total_steps) >= total_steps:
            errors.append(f"phases[{i}].until={until} is not before the end of the run ({total_steps} steps): "
                          f"phases[{i + 1}] would never run")
    for (_, a), (j, b) in zip(untils, untils[1:]):
        if total_steps is None and not _same_kind(a, b):
            continue
        ends = (a, b) if total_steps is None else (to_step(a, total_steps), to_step(b, total_steps))
        if ends[1] <= ends[0]:
            errors.append(f"phases[{j}].until={b} must come after phases[{j - 1}].until={a}")
    return errors


def _total_steps_errors(config: ScheduleConfig, total_steps: int) -> list[str]:
    """What only the run's length can show: steps past the end, ramps and phases out of order."""
    errors = []
    if config.lambda_schedule in RAMPS:
        for name in ("ramp_start", "ramp_end"):
            bound = getattr(config, name)
            if to_step(bound, total_steps) > total_steps:
                errors.append(f"{name}={bound} is past the end of the run ({total_steps} steps); "
                              "a fraction like 1.0 means the end")
        errors += _ramp_order_errors(config.ramp_start, config.ramp_end, total_steps)
    return errors + _phase_order_errors(config.phases, total_steps)


__all__ = ["ScheduleConfig", "Objective", "StepPlan", "Schedule", "lambda_at", "to_step"]
