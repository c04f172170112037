"""The backends: torch and mlx implementations of `hpd.models.backend.Backend`, each
imported only when first asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpd.models.backend import Backend


def get_backend(name: str, config=None) -> Backend:
    """The backend named `name` (a `hpd.models.backend.Backend`), imported only now."""
    if name == "torch":
        from hpd.backends.torch import TorchBackend

        return TorchBackend(config)
    if name == "mlx":
        from hpd.backends.mlx import MlxBackend

        return MlxBackend(config)
    raise ValueError(f"unknown backend {name!r}; allowed: torch, mlx")
