"""`hpd distill`: options are generated from `hpd.train.config.DistillConfig`, the one place
that holds defaults and help; only the flags a user sets override the recipe."""

from __future__ import annotations

import dataclasses

import click

from hpd.train.config import DistillConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _options(func):
    for f in reversed(dataclasses.fields(DistillConfig)):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = ", ".join(map(str, default)) if isinstance(default, (list, dict)) else default
        help_text = f"{f.metadata['help']} [default: {shown if shown not in ('', None) else 'none'}]"
        if f.type == "bool":
            decl = f"{flag}/--no-{f.name.replace('_', '-')}"
            func = click.option(decl, f.name, default=None, help=help_text)(func)
            continue
        if str(f.metadata.get("cli")).startswith("named:"):  # one VALUE, or NAME=VALUE pairs (repeatable)
            func = click.option(flag, f.name, multiple=True, help=help_text, metavar="[NAME=]VALUE")(func)
            continue
        if f.metadata.get("cli") == "multiple":  # repeatable; a list, or NAME=VALUE pairs for a dict
            metavar = "NAME=COLUMN" if f.type == "dict" else "NAME"
            func = click.option(flag, f.name, multiple=True, help=help_text, metavar=metavar)(func)
            continue
        choices = f.metadata.get("choices")
        kind = click.Choice([str(c) for c in choices]) if choices else _TYPES[f.type]
        func = click.option(flag, f.name, type=kind, default=None, help=help_text)(func)
    return func


def _named(field: str, target: str, values) -> dict:
    """--teacher SOURCE, or --teacher NAME=SOURCE repeated: {field: SOURCE} or {target: {NAME: SOURCE}}."""
    from hpd.train.config import TEACHER_NAME

    flag = "--" + field.replace("_", "-")
    named, plain = {}, []
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and TEACHER_NAME.match(name) and rest:
            if name in named:
                raise click.BadParameter(f"{name!r} is named twice", param_hint=flag)
            named[name] = rest
        else:
            plain.append(value)
    if plain and (named or len(plain) > 1):
        raise click.BadParameter(f"{', '.join(map(repr, plain))}: with several values, name each as NAME=VALUE",
                                 param_hint=flag)
    return {target: named} if named else {field: plain[0]}


def _method_params(params) -> dict[str, float]:
    """--param NAME=VALUE items as method parameters."""
    out = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--param")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {value.strip()!r} is not a number", param_hint="--param") from None
    return out


@click.command(context_settings={"max_content_width": 100},
               short_help="Distil a teacher into a student and export it.")
@click.option("--recipe", type=str, default=None,
              help="recipe YAML (or a shipped recipe name such as `tiny`); flags override it")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="a method parameter, e.g. --param beta=0.5 (repeatable)")
@_options
def distill(recipe, params, **flags):
    """Distil TEACHER into STUDENT on DATA and export the student to OUT.

    \b
    Every option can also be set in a recipe YAML under the same name (with
    underscores); method parameters go under `method_params`, and the hybrid
    schedule under `schedule`. Step bounds in [0, 1] are fractions of the run.
    For example, forward KL for the first 10% of steps, then HPD plus 0.1 x SFT,
    with the share of steps on student rollouts ramping from 0 to 0.5 between
    10% and 60% of training:

    \b
      method: hpd
      schedule:
        lambda_schedule: linear   # constant | linear | cosine | adaptive
        lambda_start: 0.0
        lambda_end: 0.5
        ramp_start: 0.1
        ramp_end: 0.6
        phases:
          - {until: 0.1, objectives: {fkl: 1.0}}
          - objectives: {hpd: 1.0, sft: 0.1}

    With `rollout_mix: rows` in the schedule, lambda is the share of every step's
    rows that student rollouts replace (a coin per row) instead of the share of
    steps trained on rollouts alone: the other rows keep their data, so HPD's data
    token stays beside the student's sample in every step.
    """
    overrides = {k: (int(v) if k in ("teacher_quantize", "student_quantize") else v) for k, v in flags.items()
                 if v is not None and v != ()}
    for f in dataclasses.fields(DistillConfig):
        target = str(f.metadata.get("cli"))
        if target.startswith("named:") and f.name in overrides:
            overrides.update(_named(f.name, target.split(":", 1)[1], overrides.pop(f.name)))
    if params:
        overrides["method_params"] = _method_params(params)
    try:
        cfg = DistillConfig.from_recipe(recipe, overrides) if recipe else DistillConfig.from_dict(overrides)
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None

    from hpd.cli.errors import fail, interrupted_before_start
    from hpd.teachers.served_client import TeacherUnavailable
    from hpd.train.checkpoint import CheckpointError
    from hpd.train.interrupt import Interrupted
    from hpd.train.loop import NonFiniteLoss
    from hpd.train.rollout import RolloutEngineError
    from hpd.train.run import command_line
    from hpd.train.run import distill as run

    try:
        result = run(cfg, command=command_line())
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLoss) as e:
        fail(str(e))
    except (CheckpointError, TeacherUnavailable, RolloutEngineError) as e:  # the disk, a teacher server or the
        # rollout engine, not the input: run-time failures
        fail(str(e), 1)
    except Interrupted as e:  # SIGINT / SIGTERM: checkpoint written, resume command given
        fail(str(e), e.status)
    except KeyboardInterrupt:
        interrupted_before_start()
    if result.get("dry_run"):
        return
    if result["backend"].rank != 0:  # under torchrun or mlx.launch, rank 0 reports
        return
    summary = result["metrics"]
    keys = [k for k in ("loss", "kl", "eval/loss", "eval/kl") if k in summary]
    click.echo(f"done: {result['steps']} steps; " + ", ".join(f"{k} {summary[k]:.4f}" for k in keys))
    if "eval/accuracy" in summary and "eval/student_accuracy_before" in summary:
        teacher = summary.get("eval/teacher_accuracy_before")
        click.echo(f"held-out exact match: student {summary['eval/student_accuracy_before']:.3f} before, "
                   f"{summary['eval/accuracy']:.3f} after"
                   + (f"; teacher {teacher:.3f}" if teacher is not None else ""))
