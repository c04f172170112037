"""`hpd distill`: options are generated from `hpd.config.DistillConfig`, the one place
that holds defaults and help; only the flags a user sets override the recipe."""

from __future__ import annotations

import dataclasses
import sys

import click

from hpd.config import DistillConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _options(func):
    for f in reversed(dataclasses.fields(DistillConfig)):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{f.metadata['help']} [default: {default if default != '' else 'none'}]"
        if f.type == "bool":
            decl = f"{flag}/--no-{f.name.replace('_', '-')}"
            func = click.option(decl, f.name, default=None, help=help_text)(func)
            continue
        choices = f.metadata.get("choices")
        kind = click.Choice([str(c) for c in choices]) if choices else _TYPES[f.type]
        func = click.option(flag, f.name, type=kind, default=None, help=help_text,
                            metavar=None if choices else f.type.upper())(func)
    return func


@click.command(context_settings={"max_content_width": 100})
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
    """
    overrides = {k: (int(v) if k in ("teacher_quantize", "student_quantize") else v) for k, v in flags.items() if v is not None}
    if params:
        method_params = {}
        for item in params:
            name, sep, value = item.partition("=")
            if not sep:
                raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--param")
            method_params[name.strip()] = float(value)
        overrides["method_params"] = method_params
    try:
        cfg = DistillConfig.from_recipe(recipe, overrides) if recipe else DistillConfig.from_dict(overrides)
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None

    from hpd.run import command_line, distill as run

    try:
        result = run(cfg, command=command_line())
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if result.get("dry_run"):
        return
    if result["backend"].rank != 0:  # under torchrun or mlx.launch, rank 0 reports
        return
    summary = result["metrics"]
    keys = [k for k in ("loss", "eval/loss", "eval/kl") if k in summary]
    click.echo(f"done: {result['steps']} steps; " + ", ".join(f"{k} {summary[k]:.4f}" for k in keys))
    if "eval/accuracy" in summary and "eval/student_accuracy_before" in summary:
        click.echo(f"held-out exact match: student {summary['eval/student_accuracy_before']:.3f} before, "
                   f"{summary['eval/accuracy']:.3f} after; teacher {summary['eval/teacher_accuracy_before']:.3f}")
    click.echo(f"student exported to {result['out']}")
