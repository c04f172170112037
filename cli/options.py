"""Options and set-up that several `hpd` commands share (distill builds its own from the config)."""

from __future__ import annotations

from types import SimpleNamespace

import click

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def backend(help: str, choices=("torch", "mlx")):
    return click.option("--backend", type=click.Choice(list(choices)), default="torch", show_default=True, help=help)


def dtype(help: str):
    return click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES), help=help)


def device(help: str = "device for the torch backend"):
    return click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES), help=help)


def progress():
    return click.option("--progress/--no-progress", default=True, show_default=True, help="show a progress bar")


def seed(help: str):
    return click.option("--seed", default=0, show_default=True, type=int, help=help)


def temperature(help: str):
    return click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                        help=help)


def max_new_tokens(default: int, help: str):
    return click.option("--max-new-tokens", default=default, show_default=True, type=click.IntRange(min=1),
                        help=help)


def batch_size(default: int, help: str):
    return click.option("--batch-size", default=default, show_default=True, type=click.IntRange(min=1), help=help)


def inference_backend(name: str, device: str, dtype: str):
    """The backend that runs a model for inference; a device this machine lacks is the
    command's one-line error."""
    from hpd.backends import get_backend

    try:
        return get_backend(name, SimpleNamespace(device=device, dtype=dtype, gradient_checkpointing=False))
    except ValueError as e:  # e.g. --device cuda without CUDA
        from hpd.cli.errors import fail

        fail(str(e))


# ----------------------------------------------------------------------------- vLLM (--backend vllm)


def vllm_engine():
    """--tensor-parallel-size, --pipeline-parallel-size and --vllm-arg KEY=VALUE: how the vLLM
    engine of --backend vllm is laid out (passed to vllm.LLM as they are)."""

    def decorate(func):
        func = click.option("--vllm-arg", "vllm_args", multiple=True, metavar="KEY=VALUE",
                            help="--backend vllm: any other vllm.LLM argument, e.g. gpu_memory_utilization=0.85 or "
                                 "max_model_len=4096 (repeatable; values read as JSON where they parse)")(func)
        func = click.option("--pipeline-parallel-size", default=1, show_default=True, type=click.IntRange(min=1),
                            help="--backend vllm: pipeline stages (GPUs) the model's layers are split over")(func)
        return click.option("--tensor-parallel-size", default=1, show_default=True, type=click.IntRange(min=1),
                            help="--backend vllm: GPUs each layer is split over")(func)

    return decorate


def check_vllm_flags(backend: str, tensor_parallel_size: int, pipeline_parallel_size: int, vllm_args) -> None:
    if backend != "vllm" and (tensor_parallel_size != 1 or pipeline_parallel_size != 1 or vllm_args):
        raise click.UsageError(f"--tensor-parallel-size, --pipeline-parallel-size and --vllm-arg lay out a vLLM "
                               f"engine; they need --backend vllm (not {backend})")


def start_vllm(model: str, *, dtype: str, seed: int, tensor_parallel_size: int, pipeline_parallel_size: int,
               vllm_args, max_model_len: int = 0, max_logprobs: int = 20):
    """A vLLM engine on `model` in this process; a missing vLLM or a failed start is the
    command's one-line error."""
    from hpd.cli.errors import fail
    from hpd.engines import vllm as engines

    try:
        extra = engines.parse_engine_args(vllm_args)
    except ValueError as e:
        fail(str(e))
    settings = engines.EngineOptions(dtype=dtype, max_model_len=max_model_len, max_logprobs=max_logprobs, seed=seed,
                                     tensor_parallel_size=tensor_parallel_size,
                                     pipeline_parallel_size=pipeline_parallel_size, extra=extra)
    try:
        return engines.start(model, settings)
    except ImportError as e:
        fail(str(e))
    except Exception as e:  # vLLM's start raises many kinds (config, memory, devices): say the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"vLLM could not start {model}: {first}", 1)


__all__ = ["backend", "batch_size", "device", "dtype", "inference_backend", "max_new_tokens", "progress", "seed",
           "temperature", "vllm_engine", "check_vllm_flags", "start_vllm"]
