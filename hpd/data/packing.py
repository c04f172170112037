"""Sequence packing: a micro-batch's rows concatenated into few sequences, so padding
costs (almost) nothing in either model's forward or in the loss.

A packed batch keeps every key of a plain one, and adds
    position_ids (B', L)  each token's position inside its own row (restarting at 0);
    token_rows   (B', L)  each token's global row index, -1 on padding;
and its targets never cross a boundary: a row's last token has no target, as when
it is the last token of a padded line. The backends keep attention inside each row
(torch: transformers' packed-sequence mask from the position ids; mlx: a
block-diagonal causal mask), so the loss and gradients equal the unpacked batch's.

The rows of a micro-batch are packed into bins no wider than its longest row (first
fit, longest first): the packed batch is never wider than the padded one, so no
sequence's attention grows; the number of sequences, and the padding, shrink. The set
of rows in a micro-batch, and so every split-invariant quantity, is unchanged.
"""

from __future__ import annotations

import numpy as np

from hpd.data.examples import IGNORE_INDEX, Example
from hpd.data.routing import row_routes


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity (first fit
    decreasing; ties keep the input order, so packing is deterministic)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a bin of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def collate_packed(examples: list[Example], pad_id: int, rows=None, capacity: int | None = None
                   ) -> dict[str, np.ndarray]:
    """The rows of `examples` packed into (B', L) arrays (see the module docstring).

    rows: the global row index of each example (default 0..n-1); capacity: bin width
    (default: the longest row, so the result is never wider than `collate`'s)."""
    lengths = [len(e.input_ids) for e in examples]
    rows = list(range(len(examples))) if rows is None else [int(r) for r in rows]
    bins = pack_bins(lengths, capacity or max(lengths))
    width = max(sum(lengths[i] for i in b) for b in bins)
    shape = (len(bins), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    token_rows = np.full(shape, -1, dtype=np.int64)
    # padding gets positions of its own (0, 1, ...): a segment that no real token attends to
    position_ids = np.zeros(shape, dtype=np.int64)
    routed = row_routes(examples) is not None
    route = np.full(shape, -1, dtype=np.int64)  # each position's teacher (hpd.data.routing)
    for line, members in enumerate(bins):
        at = 0
        for i in members:
            e, n = examples[i], lengths[i]
            ids, mask = np.asarray(e.input_ids), np.asarray(e.loss_mask, dtype=bool)
            input_ids[line, at:at + n] = ids
            targets[line, at:at + n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            token_rows[line, at:at + n] = rows[i]
            route[line, at:at + n] = e.route
            position_ids[line, at:at + n] = np.arange(n)
            at += n
        position_ids[line, at:] = np.arange(width - at)
    batch = {"input_ids": input_ids, "attention_mask": np.ones(shape, dtype=np.int64), "targets": targets,
             "position_ids": position_ids, "token_rows": token_rows,
             "rows": np.asarray(rows, dtype=np.int64),
             "prompt_lens": np.asarray([e.prompt_len for e in examples], dtype=np.int64)}
    if routed:
        batch["route"] = route
    return batch


def segments(position_ids: np.ndarray) -> np.ndarray:
    """(B, L) segment numbers: a new segment starts wherever the position is 0."""
    return np.cumsum(np.asarray(position_ids) == 0, axis=-1)


def block_causal_mask(position_ids: np.ndarray) -> np.ndarray:
    """(B, 1, L, L) bool: query t may attend key j iff j <= t and both lie in one row."""
    seg = segments(position_ids)
    length = seg.shape[-1]
    causal = np.tril(np.ones((length, length), dtype=bool))
    return (seg[:, :, None] == seg[:, None, :])[:, None] & causal


__all__ = ["pack_bins", "collate_packed", "segments", "block_causal_mask"]
