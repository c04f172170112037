"""`hpd export CHECKPOINT --out DIR`: a checkpoint's student as a standalone folder."""

from __future__ import annotations

import click


@click.command(short_help="Export a checkpoint's student as a model folder.")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write")
@click.option("--overwrite", is_flag=True, help="replace a non-empty --out folder")
def export(checkpoint, out, overwrite):
    """Export a checkpoint's student as a model folder.

    CHECKPOINT is a run's checkpoint folder (e.g. RUN/checkpoints/step-100); OUT gets the
    student without its training state, loadable by transformers and mlx-lm, with a model card."""
    from hpd.export import export_checkpoint

    try:
        path = export_checkpoint(checkpoint, out, overwrite=overwrite)
    except (FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # a hostile or damaged checkpoint: named, never followed
        from hpd.cli.errors import fail

        fail(str(e))
    click.echo(f"exported {checkpoint} to {path}")
