"""`hpd eval`: accuracy, perplexity and KL to the teacher on held-out data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import click


@click.command(name="eval")
@click.option("--backend", type=click.Choice(["torch", "mlx"]), default="torch", show_default=True)
@click.option("--model", required=True, help="model folder or hub id to evaluate")
@click.option("--teacher", default=None, help="teacher folder: also report token-level KL(teacher || model)")
@click.option("--data", required=True, type=str,
              help="JSONL of prompt/completion (or messages) rows with reference answers")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="1: greedy decoding; K: mean accuracy over K sampled generations")
@click.option("--extractor", default="answer", show_default=True,
              help="answer extractor: answer (after the last 'Answer:'), last-number, exact, or regex:PATTERN")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="sampling temperature when --samples > 1")
@click.option("--limit", default=0, show_default=True, type=click.IntRange(min=0), help="first N rows only (0: all)")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
@click.option("--progress/--no-progress", default=True, show_default=True)
def evaluate(backend, model, teacher, data, samples, extractor, max_new_tokens, temperature, limit, batch_size,
             seed, device, as_json, progress):
    """Exact-match accuracy of MODEL's generations on DATA, its perplexity, and its token-level
    KL to --teacher."""
    from hpd.backend import get_backend
    from hpd.evaluate import accuracy, get_extractor, likelihood
    from hpd.models import asset_path

    data = asset_path(data)

    try:
        get_extractor(extractor)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--extractor") from None
    try:
        be = get_backend(backend, SimpleNamespace(device=device, dtype="auto", gradient_checkpointing=False))
    except ValueError as e:  # e.g. --device cuda without CUDA
        from hpd.cli.errors import fail

        fail(str(e))
    be.seed(seed)
    try:
        tok = be.load_tokenizer(model)
        net = be.load_model(model, trainable=False)
        ref = be.load_model(teacher, trainable=False) if teacher else None
        result = {"model": model, "data": data}
        result.update(accuracy(be, net, tok, data, extractor=extractor, samples=samples, limit=limit or None,
                               max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                               progress=progress))
        result.update(likelihood(be, net, tok, data, teacher=ref, batch_size=batch_size))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        click.echo(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
