"""`hpd generate`: teacher responses as a data file (sequence-level KD)."""

from __future__ import annotations

from types import SimpleNamespace

import click


@click.command()
@click.option("--backend", type=click.Choice(["torch", "mlx"]), default="torch", show_default=True,
              help="framework that runs the model")
@click.option("--model", required=True, help="model folder or hub id (usually the teacher)")
@click.option("--data", required=True, type=str,
              help="JSONL of {prompt} or {messages} rows (a final assistant turn is dropped)")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="JSONL to write; an existing file is resumed without duplicating rows")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="responses per prompt")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: off")
@click.option("--greedy", is_flag=True, help="greedy decoding instead of sampling")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate(backend, model, data, out, samples, max_new_tokens, temperature, top_p, top_k, greedy,
             batch_size, seed, dtype, device, progress):
    """Write MODEL's responses to the prompts in DATA as prompt/completion rows in OUT,
    ready for `hpd distill --data OUT`."""
    from hpd.backend import get_backend
    from hpd.data import DataError
    from hpd.models import asset_path

    data = asset_path(data)
    from hpd.rollout import Sampling, generate_file

    try:
        be = get_backend(backend, SimpleNamespace(device=device, dtype=dtype, gradient_checkpointing=False))
    except ValueError as e:  # e.g. --device cuda without CUDA
        from hpd.cli.errors import fail

        fail(str(e))
    be.seed(seed)
    try:
        tok = be.load_tokenizer(model)
        net = be.load_model(model, trainable=False, dtype=dtype)
        n = generate_file(be, net, tok, data, out, samples=samples, greedy=greedy, batch_size=batch_size,
                          progress=progress, sampling=Sampling(max_new_tokens, temperature, top_p, top_k))
    except (DataError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {n} rows to {out}")
