"""`hpd generate`: teacher responses as a data file (sequence-level KD)."""

from __future__ import annotations

import click

from hpd.cli import options


@click.command(short_help="Write a model's responses to prompts as a data file.")
@options.backend("framework that runs the model")
@click.option("--model", required=True, help="model folder or hub id (usually the teacher)")
@click.option("--data", required=True, type=str,
              help="JSONL of {prompt} or {messages} rows (a final assistant turn is dropped)")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="JSONL to write; an existing file is resumed without duplicating rows")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="responses per prompt")
@options.max_new_tokens(256, "longest response, in new tokens")
@options.temperature("sampling temperature")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="nucleus sampling (1: off)")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="top-k sampling (0: off)")
@click.option("--greedy", is_flag=True, help="greedy decoding instead of sampling")
@options.batch_size(8, "prompts generated together")
@options.seed("seed for sampling")
@options.dtype("model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
@options.device()
@options.progress()
def generate(backend, model, data, out, samples, max_new_tokens, temperature, top_p, top_k, greedy,
             batch_size, seed, dtype, device, progress):
    """Write MODEL's responses to the prompts in DATA as rows of OUT, ready for
    `hpd distill --data OUT`: {prompt, completion} rows for {prompt} input, {messages} rows
    (the response as the final assistant turn) for {messages} input."""
    from hpd.data.examples import DataError
    from hpd.models.loading import asset_path

    data = asset_path(data)
    from hpd.train.rollout import Sampling, generate_file

    be = options.inference_backend(backend, device, dtype)
    be.seed(seed)
    try:
        tok = be.load_tokenizer(model)
        net = be.load_model(model, trainable=False, dtype=dtype)
        n = generate_file(be, net, tok, data, out, samples=samples, greedy=greedy, batch_size=batch_size,
                          progress=progress, sampling=Sampling(max_new_tokens, temperature, top_p, top_k))
    except (DataError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {n} row{'' if n == 1 else 's'} to {out}")
