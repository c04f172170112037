"""The mlx backend (mlx-lm models). Imported only when `--backend mlx` is used."""

from hpd.backends.mlx.backend import MlxBackend

__all__ = ["MlxBackend"]
