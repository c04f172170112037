"""`hpd plot RUN_DIR... --out curves.png`."""

from __future__ import annotations

import click


@click.command(short_help="Plot the training curves of one or several runs.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="curves.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write")
def plot(runs, out):
    """Plot loss, KL to the teacher and eval accuracy against step for one or several RUNS
    (hpd distill output folders), one line per run, labelled by method."""
    from hpd.report.plot import plot_runs

    try:
        path = plot_runs(runs, out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")
