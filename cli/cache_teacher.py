"""`hpd cache-teacher`: the teacher's top-k log-probs on a data file, stored for training."""

from __future__ import annotations

import click

from hpd.cli import options
from hpd.cli.errors import fail


@click.command("cache-teacher", context_settings={"max_content_width": 100},
               short_help="Store a teacher's top-k log-probs for training without it.")
@options.backend("framework that runs the teacher (either training backend reads the store); vllm: an "
                 "in-process vLLM engine's prompt log-probs (temperature 1, the teacher's own tokenizer), scaled "
                 "with the flags below", choices=("torch", "mlx", "vllm"))
@click.option("--teacher", required=True, help="teacher model: a local folder, a hub id, or hpd:tiny/teacher")
@click.option("--data", required=True, help="training data JSONL, as later passed to `hpd distill --data`")
@click.option("--student", default=None,
              help="the student (a model or tokenizer folder): lay the store on its tokenizer, as `hpd distill "
                   "--student` will read the data; another tokenizer than the teacher's is aligned to it "
                   "[default: the teacher's tokenizer]")
@click.option("--teacher-tokenizer", default="auto", show_default=True, type=click.Choice(["auto", "same", "cross"]),
              help="with --student: same (one tokenizer), cross (align the teacher's rows to the student's "
                   "tokenizer), auto (same when the vocabularies are equal token for token, else cross)")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="store folder (safetensors shards + index.json)")
@click.option("--top-k", default=32, show_default=True, type=click.IntRange(min=1),
              help="teacher log-probs kept per position (at most the vocabulary size)")
@click.option("--max-length", default=1024, show_default=True, type=click.IntRange(min=2),
              help="truncate rows as `hpd distill --max-length` will (the two must match)")
@options.batch_size(8, "sequences per teacher forward pass")
@options.temperature("teacher softmax temperature (distill must use the same)")
@click.option("--teacher-quantize", default="0", show_default=True, type=click.Choice(["0", "4", "8"]),
              help="mlx: quantize the teacher to 4 or 8 bits at load (0: off)")
@click.option("--logprob-bits", default="auto", show_default=True,
              type=click.Choice(["auto", "8", "12", "16", "32"]),
              help="bits per stored log-prob: 16 (error <= 3.1e-4 nats), 12 (<= 3.9e-3), 8 (<= 0.031), "
                   "32 (float32, lossless); auto: 16 for a vocabulary <= 65536 (140 bytes/position at "
                   "k=32), else 12 (156 bytes/position with 3-byte ids)")
@click.option("--examples-per-shard", default=1024, show_default=True, type=click.IntRange(min=1),
              help="examples per safetensors shard (the unit that a resume continues from)")
@click.option("--chunk-size", default=1024, show_default=True, type=click.IntRange(min=1),
              help="positions projected through the teacher's head at a time")
@click.option("--resume", is_flag=True, help="continue a store that a kill interrupted")
@click.option("--overwrite", is_flag=True, help="replace the teacher store in --out")
@options.dtype("teacher dtype")
@options.device()
@options.progress()
@options.vllm_engine()
def cache_teacher(backend, teacher, data, student, teacher_tokenizer, out, top_k, max_length, batch_size,
                  temperature, teacher_quantize, logprob_bits, examples_per_shard, chunk_size, resume, overwrite,
                  dtype, device, progress, tensor_parallel_size, pipeline_parallel_size, vllm_args):
    """Run TEACHER once over DATA and store its top-k log-probs in OUT, for
    `hpd distill --teacher-cache OUT` (no teacher in memory while training).

    \b
    hpd cache-teacher --teacher hpd:tiny/teacher --data hpd:tiny/train.jsonl --out cache/
    hpd distill --teacher-cache cache/ --student hpd:tiny/student --data hpd:tiny/train.jsonl ...
    """
    from hpd.data.examples import DataError
    from hpd.models.loading import asset_path
    from hpd.teachers.cache import CacheOptions
    from hpd.teachers.cache import cache_teacher as run

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    options.check_vllm_flags(backend, tensor_parallel_size, pipeline_parallel_size, vllm_args)
    if backend == "vllm" and teacher_quantize != "0":
        raise click.UsageError("--teacher-quantize quantizes an mlx teacher; for vLLM pass --vllm-arg quantization=...")
    teacher, data = asset_path(teacher), asset_path(data)
    engines = []
    try:
        be = options.inference_backend("torch" if backend == "vllm" else backend, device, dtype)
        tokenizer = be.load_tokenizer(teacher)
        student_tok = be.load_tokenizer(asset_path(student)) if student else None
        settings = CacheOptions(top_k=top_k, max_length=max_length, batch_size=batch_size, temperature=temperature,
                                logprob_bits=logprob_bits, examples_per_shard=examples_per_shard,
                                chunk_size=chunk_size, teacher_quantize=int(teacher_quantize), resume=resume,
                                overwrite=overwrite, progress=progress)
        if backend == "vllm":
            from hpd.teachers.vllm_cache import cache_teacher_vllm

            def engine(max_model_len: int):  # started once the data and the folder are accepted
                engines.append(options.start_vllm(
                    teacher, dtype=dtype, seed=0, tensor_parallel_size=tensor_parallel_size,
                    pipeline_parallel_size=pipeline_parallel_size, vllm_args=vllm_args, max_model_len=max_model_len,
                    max_logprobs=top_k))
                return engines[-1]

            index = cache_teacher_vllm(engine, tokenizer, data, out, settings, teacher_name=teacher,
                                       student_tokenizer=student_tok, tokenizer_mode=teacher_tokenizer)
        else:
            model = be.load_model(teacher, trainable=False, dtype=dtype, quantize=int(teacher_quantize))
            index = run(be, model, tokenizer, data, out, settings, teacher_name=teacher,
                        student_tokenizer=student_tok, tokenizer_mode=teacher_tokenizer)
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        fail(str(e))
    finally:
        for started in engines:
            started.shutdown()
    size = sum(s["bytes"] for s in index["shards"])
    click.echo(f"stored {index['positions']} positions of {index['examples']} examples in {out} "
               f"({size / max(index['positions'], 1):.1f} bytes/position on disk, top-{index['top_k']})")
