"""mlx models on disk: resolving a local folder or hub id, dtypes, quantizing a base as
mlx-lm does, and a model's size and shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from hpd.backends.mlx import family
from hpd.models.loading import hub_failure, local_or_hub

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
QUANT_GROUP_SIZES = (64, 32)  # mlx also allows 128; 64 is mlx-lm's default


@dataclass
class ModelInfo:
    """What hpd remembers about a loaded model: the config to export, and how it was loaded."""

    config: dict
    path: str
    quantize: int = 0
    layers_quantized: int = 0
    bytes_before_quantize: int = 0


def resolve_model_path(path: str) -> Path:
    """A local model folder, or a hub id fetched with huggingface_hub."""
    source = local_or_hub(path)
    if isinstance(source, Path):
        return source
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(source, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:  # the hub client raises several unrelated types
        raise hub_failure(path, e) from e


def param_bytes(model) -> int:
    """Bytes held by a model's arrays (quantized weights count their scales and biases)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def info_of(model) -> ModelInfo:
    info = getattr(model, "hpd_info", None)
    if info is None:
        raise ValueError("this model was not loaded by the mlx backend (no hpd_info)")
    return info


def quantize_model(model, bits: int) -> int:
    """Affine-quantize every linear and embedding layer whose input width allows a group
    size; returns how many layers were quantized."""
    count = 0
    own = getattr(model, "quant_predicate", None)

    def predicate(path, module):
        nonlocal count
        if not hasattr(module, "to_quantized"):
            return False
        width = module.weight.shape[-1]
        group = next((g for g in QUANT_GROUP_SIZES if width % g == 0), None)
        if group is None or (own is not None and not own(path, module)):
            return False
        count += 1
        return {"group_size": group, "bits": bits}

    nn.quantize(model, class_predicate=predicate)
    return count


def head_module(model):
    return family.head_module(model)
