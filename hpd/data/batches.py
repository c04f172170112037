"""Batching: a data file read, encoded and truncated into a Dataset; right-padded arrays; seeded,
resumable micro-batches (packed when asked)."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np

from hpd.data.examples import IGNORE_INDEX, DataError, Dataset, Example, encode_row
from hpd.data.packing import collate_packed
from hpd.data.routing import Route, row_routes
from hpd.data.sources import read_rows


def load_dataset(path: str | Path, tokenizer, max_length: int, *, split: str = "", columns=None,
                 default_splits: tuple[str, ...] = ("train",), route: Route | None = None) -> Dataset:
    """Every row encoded and truncated to max_length; raises DataError on any bad row.
    The file kinds and row shapes read are those of hpd.data.sources and hpd.data.formats;
    with `route`, each row also names its teacher (hpd.data.routing)."""
    examples, wheres, truncated = [], [], 0
    rows = read_rows(path, split=split, columns=columns, default_splits=default_splits)
    for where, row in rows:
        try:
            ex = encode_row(row, tokenizer)
            if route is not None:
                ex.route = route.of(row)
        except ValueError as e:  # DataError included
            raise DataError(f"{where}: {e}") from None
        if len(ex.input_ids) > max_length:
            truncated += 1
            ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length], min(ex.prompt_len, max_length),
                         ex.route)
        if any(ex.loss_mask[1:]):
            examples.append(ex)
            wheres.append(where)
    if not examples:
        raise DataError(f"{path}: no row has a trainable token (after truncation to {max_length} tokens)")
    return Dataset(str(path), examples, truncated=truncated, rows=len(rows), where=wheres)


def collate(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (B, L) arrays; targets[b, t] is the token that logits[b, t] must predict."""
    length = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    attention = np.zeros((b, length), dtype=np.int64)
    targets = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    prompt_lens = np.zeros((b,), dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = e.input_ids
        attention[i, :n] = 1
        ids, mask = np.asarray(e.input_ids), np.asarray(e.loss_mask, dtype=bool)
        targets[i, : n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        prompt_lens[i] = e.prompt_len
    batch = {"input_ids": input_ids, "attention_mask": attention, "targets": targets, "prompt_lens": prompt_lens}
    routes = row_routes(examples)
    if routes is not None:  # each position's teacher
        batch["route"] = np.repeat(routes[:, None], length, axis=1)
    return batch


class Batches:
    """Micro-batches in a seeded order per epoch, resumable from (epoch, index).

    With several processes, each rank takes every world_size-th micro-batch, so no row
    is seen twice in an epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, pad_id: int, *, seed: int = 0,
                 group_by_length: bool = False, rank: int = 0, world_size: int = 1, packing: bool = False):
        if len(dataset) < batch_size * world_size:
            raise DataError(
                f"{dataset.path}: {len(dataset)} usable rows, fewer than one batch "
                f"({batch_size} x {world_size} processes); lower --batch-size"
            )
        self.dataset, self.batch_size, self.pad_id = dataset, batch_size, pad_id
        self.seed, self.group_by_length = seed, group_by_length
        self.rank, self.world_size = rank, world_size
        self.packing = packing  # rows concatenated into few sequences (hpd.data.packing)
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        idx = list(range(len(self.dataset)))
        rng.shuffle(idx)
        size = self.batch_size
        if self.group_by_length:
            # sort within windows of 50 batches, then shuffle the batches
            window = size * 50
            lens = [len(e.input_ids) for e in self.dataset.examples]
            idx = [i for w in range(0, len(idx), window) for i in sorted(idx[w:w + window], key=lens.__getitem__)]
        batches = [idx[i:i + size] for i in range(0, len(idx) - size + 1, size)]
        if self.group_by_length:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        ids = self._order[self.index * self.world_size + self.rank]
        self.index += 1
        examples = [self.dataset.examples[i] for i in ids]
        if self.packing:
            return collate_packed(examples, self.pad_id, rows=ids)
        batch = collate(examples, self.pad_id)
        # rows' places in the dataset: keys of split-invariant draws and of the teacher store
        batch["rows"] = np.asarray(ids, dtype=np.int64)
        return batch

    def peek(self, n: int) -> list[dict[str, np.ndarray]]:
        """The next `n` micro-batches, without drawing them (a served teacher asks for
        their log-probs ahead of the steps that train on them)."""
        ahead = copy.copy(self)  # the order lists are replaced, never changed in place
        return [next(ahead) for _ in range(n)]

    def rewind(self, n: int) -> None:
        """Put the last `n` micro-batches back: the next draws give them again (a step
        that could not finish is checkpointed as if it had not begun)."""
        for _ in range(n):
            if self.index == 0:
                if self.epoch == 0:
                    raise ValueError("rewind: no micro-batch has been drawn")
                self.epoch -= 1
                self._order = self._epoch_order(self.epoch)
                self.index = self.batches_per_epoch
            self.index -= 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)
