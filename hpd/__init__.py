"""hpd: Hybrid Policy Distillation for language models, on PyTorch and MLX.

`import hpd` imports neither torch nor mlx; a backend is imported when first used.
"""

from hpd.losses import loss
from hpd.objectives import METHODS

__version__ = "0.1.0"


def distill(config):
    """Run a distillation from a `hpd.config.DistillConfig` (or a dict of its fields)."""
    from hpd.run import distill as _distill

    return _distill(config)


__all__ = ["loss", "distill", "METHODS", "__version__"]
