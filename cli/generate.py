"""`hpd generate`: teacher responses as a data file (sequence-level KD)."""

from __future__ import annotations

import click

from hpd.cli import options


@click.command(short_help="Write a model's responses to prompts as a data file.")
@options.backend("framework that runs the model (vllm: an in-process vLLM engine, scaled with the flags below)",
                 choices=("torch", "mlx", "vllm"))
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
@options.vllm_engine()
def generate(backend, model, data, out, samples, max_new_tokens, temperature, top_p, top_k, greedy,
             batch_size, seed, dtype, device, progress, tensor_parallel_size, pipeline_parallel_size, vllm_args):
    """Write MODEL's responses to the prompts in DATA as rows of OUT, ready for
    `hpd distill --data OUT`: {prompt, completion} rows for {prompt} input, {messages} rows
    (the response as the final assistant turn) for {messages} input."""
    from hpd.data.examples import DataError
    from hpd.models.loading import asset_path

    options.check_vllm_flags(backend, tensor_parallel_size, pipeline_parallel_size, vllm_args)
    data, model = asset_path(data), asset_path(model)
    from hpd.train.rollout import Sampling, generate_file

    be = options.inference_backend("torch" if backend == "vllm" else backend, device, dtype)
    be.seed(seed)
    engine = None
    try:
        tok = be.load_tokenizer(model)
        if backend == "vllm":  # the engine holds the model; it answers generate_file's one call
            from hpd.engines.vllm_generate import Generator

            engine = options.start_vllm(model, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                                        pipeline_parallel_size=pipeline_parallel_size, vllm_args=vllm_args)
            be, net = Generator(engine), None
        else:
            net = be.load_model(model, trainable=False, dtype=dtype)
        n = generate_file(be, net, tok, data, out, samples=samples, greedy=greedy, batch_size=batch_size,
                          progress=progress, sampling=Sampling(max_new_tokens, temperature, top_p, top_k))
    except (DataError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if engine is not None:
            engine.shutdown()
    if getattr(be, "cut", 0):
        click.echo(f"warning: {be.cut} responses stopped at the engine's max_model_len ({be.limit} tokens, prompt "
                   "included) before --max-new-tokens; raise it with --vllm-arg max_model_len=N", err=True)
    click.echo(f"wrote {n} row{'' if n == 1 else 's'} to {out}")
