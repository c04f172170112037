"""The `hpd` command: each subcommand lives in its own module; this file only dispatches."""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make torch 5-10x slower on a laptop whose cores
# are busy with anything else; waiting passively costs nothing measurable otherwise.
# Set before torch loads; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hpd.train import allocator  # noqa: E402

# Large per-step buffers reused from the heap instead of page-faulted afresh (hpd.train.allocator).
allocator.tune()

import click  # noqa: E402

from hpd import __version__  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hpd")
def cli():
    """Distil a large language model into a small one (Hybrid Policy Distillation).

    \b
    hpd distill --recipe tiny                 the embedded tiny default, no download
    hpd distill --teacher T --student S --data train.jsonl --out students/s
    hpd export students/s/checkpoints/step-100 --out students/s-100
    hpd cache-teacher --teacher T --data train.jsonl --out cache/   then distill --teacher-cache cache/
    """


def _register():
    from hpd.cli.cache_teacher import cache_teacher
    from hpd.cli.distill import distill
    from hpd.cli.evaluate import evaluate
    from hpd.cli.export import export
    from hpd.cli.generate import generate
    from hpd.cli.plot import plot

    for command in (distill, cache_teacher, export, generate, evaluate, plot):
        cli.add_command(command)


_register()


def main():
    cli()


if __name__ == "__main__":
    main()
