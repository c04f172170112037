"""Packed batches on mlx: several examples per row, each attending only to itself, through
mlx-lm's layer-cache interface."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class PackedRows:
    """Stands in for an mlx-lm layer cache to run a packed batch (hpd.data.packing) through an
    unchanged mlx-lm model: the models build their attention mask from the cache
    (`make_mask`) and take the rotary offset from it, and this one caches nothing.

    The mask is block-diagonal and causal, so no token attends across a row boundary.
    Positions are not restarted per row (RoPE's offset is per sequence in mlx), and need
    not be: a rotary embedding makes each score depend only on the distance between query
    and key, which is the same inside a row wherever the row starts."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if window_size is not None:
            raise ValueError("--packing: sliding-window attention is not supported on the mlx backend")
        return self.mask

    def update_and_fetch(self, keys, values):
        return keys, values


def packed_cache(model, block_mask: mx.array) -> list[PackedRows]:
    args = getattr(model, "args", None)
    if getattr(args, "rope_scaling", None) and args.rope_scaling.get("type", args.rope_scaling.get(
            "rope_type")) in ("dynamic", "longrope"):
        # these scale the rotation by the sequence length, which packing changes
        raise ValueError("--packing: length-dependent rope scaling is not supported on the mlx backend")
    return [PackedRows(block_mask)] * len(model.layers)


def right_padded(mask: np.ndarray) -> bool:
    """No real token after a padded one in any row."""
    if mask.ndim != 2 or mask.shape[1] < 2:
        return True
    return not bool(((mask[:, 1:] != 0) & (mask[:, :-1] == 0)).any())
