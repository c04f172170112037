"""The `schedule:` section of a recipe: its fields, their defaults and help, and every check
on them (alone, and against the run's total steps). `hpd.train.schedule` turns a checked
config into per-step decisions."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hpd.objectives.rules import get_method, resolve_params

LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "adaptive")
RAMPS = ("linear", "cosine")
SAMPLE_MODES = ("auto", "always", "never")
ROLLOUT_MIXES = ("steps", "rows")
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
    rollout_mix: str = _f("steps", "what lambda is a share of: steps (a step trains on student rollouts with "
                                   "probability lambda, all of its rows, else on the data) or rows (every step "
                                   "replaces a share lambda of its rows, a coin per row, by student rollouts and "
                                   "keeps the data in the rest, so the data token, HPD's support beside the "
                                   "student's sample, is in every step)")
    sample: str = _f("auto", "draw the per-position student sample: auto (when an active objective needs "
                             "one, e.g. hpd), always, never")
    phases: list = _f([], "objective mix over training: a list of {until, objectives}; the last phase has "
                          "no until and runs to the end; empty: the run's method with weight 1")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ScheduleConfig:
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

    def validate(self) -> ScheduleConfig:
        """Raise one ValueError listing every problem."""
        errors = [
            *_check_choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES),
            *_check_choice("sample", self.sample, SAMPLE_MODES),
            *_check_choice("rollout_mix", self.rollout_mix, ROLLOUT_MIXES),
            *_check_fraction("lambda_start", self.lambda_start),
            *self._lambda_end_errors(),
            *_check_bound("ramp_start", self.ramp_start),
            *_check_bound("ramp_end", self.ramp_end),
            *_check_adaptive_step(self.adaptive_step),
            *_check_phases(self.phases),
        ]
        if self.lambda_schedule in RAMPS and not errors:
            errors += _ramp_order_errors(self.ramp_start, self.ramp_end, total_steps=None)
        raise_all("invalid schedule config", errors)
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


# ---------------------------------------------------------------------- checks
def raise_all(header: str, errors: list[str]) -> None:
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
            errors += parse_objectives(f"{where}.objectives", phase["objectives"], {})[1]
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


def total_steps_errors(config: ScheduleConfig, total_steps: int) -> list[str]:
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


@dataclass(frozen=True)
class Objective:
    method: str
    weight: float
    params: dict  # the method's parameters, defaults filled in (e.g. {"beta": 0.5} for jsd)


# ---------------------------------------------------------------------- pure functions
def to_step(bound: float, total_steps: int) -> int:
    """A step bound as an optimizer step: [0, 1] is a fraction of total_steps, above 1 a step."""
    if bound <= 1:
        return math.floor(bound * total_steps + 0.5)
    return int(bound)


def parse_objectives(where: str, spec, inherited: dict) -> tuple[tuple[Objective, ...], list[str]]:
    """`{method: weight}` or `{method: {weight, **params}}` as Objectives, with the errors found."""
    if not isinstance(spec, dict) or not spec:
        return (), [f"{where}: expected a non-empty mapping method -> weight (or -> {{weight, params}}), "
                    f"got {spec!r}"]
    objectives, errors = [], []
    for name, value in spec.items():
        try:
            objectives.append(objective_of(name, value, inherited.get(name, {})))
        except (TypeError, ValueError) as e:
            errors.append(f"{where}.{name}: {e}")
    return tuple(objectives), errors


def objective_of(name: str, value, inherited: dict) -> Objective:
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
