"""Warnings about a recipe used far from what it was tuned for.

A recipe's learning rate and warmup are tuned for its number of steps. Cutting the steps
(`--recipe tiny --steps 20`) keeps the peak learning rate but squeezes the warmup and the
decay into a few steps; the tiny recipe then makes its student worse (held-out exact
match 0.26 -> 0.03 at 20 steps, against 0.26 kept with --lr 5e-4). The run is not
changed behind the user's back: it is told, with what to do.
"""

from __future__ import annotations

COMPRESSION = 5  # warn below 1/5 of the recipe's steps


def recipe_notes(name: str, recipe: dict, overrides: dict) -> list[str]:
    notes = []
    designed, steps = recipe.get("steps"), overrides.get("steps")
    tuned = {"lr", "warmup_ratio", "lr_schedule"} & set(overrides)
    if designed and steps and 0 < int(steps) * COMPRESSION <= int(designed) and not tuned:
        lr = float(recipe.get("lr", 0) or 0)
        warmup = float(recipe.get("warmup_ratio", 0) or 0)
        notes.append(
            f"recipe {name} is tuned for {designed} steps (peak lr {lr:g}, {warmup:.0%} warmup); "
            f"at {steps} steps the same peak comes after {_steps(round(warmup * int(steps)))} of warmup, which can "
            f"leave the student worse than it started. Lower --lr (e.g. --lr {lr / 4:g}) or run more steps.")
    return notes


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"
