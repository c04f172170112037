"""`hpd export CHECKPOINT --out DIR`: a checkpoint's student as a standalone folder."""

from __future__ import annotations

import click


@click.command(short_help="Export a checkpoint's student as a model folder.")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write")
@click.option("--overwrite", is_flag=True, help="replace a non-empty --out folder")
@click.option("--adapter-only", is_flag=True,
              help="a LoRA checkpoint: write its adapters (peft/ for PeftModel.from_pretrained, mlx-lm/ for "
                   "mlx_lm.load(base, adapter_path=...)) instead of the merged student")
@click.option("--quantized", is_flag=True,
              help="an mlx QLoRA checkpoint: write the merged student quantized as mlx-lm's fuse writes it "
                   "(for mlx_lm.load; transformers cannot read it) instead of dequantized")
def export(checkpoint, out, overwrite, adapter_only, quantized):
    """Export the student of CHECKPOINT (e.g. RUN/checkpoints/step-100) to OUT, loadable by
    transformers and mlx-lm, with a model card."""
    from hpd.train.export import export_checkpoint

    try:
        path = export_checkpoint(checkpoint, out, overwrite=overwrite, adapter_only=adapter_only,
                                 quantized=quantized)
    except (FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # a hostile or damaged checkpoint: named, never followed
        from hpd.cli.errors import fail

        fail(str(e))
    click.echo(f"exported {checkpoint} to {path}")
