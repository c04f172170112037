"""hpd: Hybrid Policy Distillation for language models, on PyTorch and MLX.

`import hpd` imports neither torch nor mlx; a backend is imported when first used.
"""

from hpd.objectives.chunked import chunked_loss
from hpd.objectives.losses import loss
from hpd.objectives.rules import METHODS

__version__ = "0.1.0"


def distill(config, **hooks):
    """Run a distillation from a `hpd.train.config.DistillConfig` (or a dict of its fields).

    Returns a dict with the output folder, the steps run, the final metrics and the
    trained student in memory."""
    from hpd.train.run import distill as _distill

    return _distill(config, **hooks)


__all__ = ["loss", "chunked_loss", "distill", "METHODS", "__version__"]
