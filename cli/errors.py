"""How a command fails: one line on stderr and a conventional exit status, no traceback."""

from __future__ import annotations

import sys

import click

USAGE = 2  # bad input: a flag, a config field, a file (as click's own usage errors)


def fail(message: str, status: int = USAGE) -> None:
    click.echo(f"Error: {message}", err=True)  # click's own prefix, as its usage errors print
    sys.exit(status)


def interrupted_before_start() -> None:
    """Ctrl-C before a run installed its own handler: nothing was trained, nothing to resume."""
    fail("interrupted (SIGINT) before training started; nothing to resume", 130)
