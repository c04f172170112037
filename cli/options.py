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


__all__ = ["backend", "batch_size", "device", "dtype", "inference_backend", "max_new_tokens", "progress", "seed",
           "temperature"]
