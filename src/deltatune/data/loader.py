"""Deterministic, resumable batching.

The order of an epoch is a permutation drawn from (seed, epoch) alone, so a run resumed from
`{"epoch": e, "index": i}` sees exactly the batches an uninterrupted run would have seen. With
several processes, each rank takes every `world_size`-th batch-sized slice of the permutation,
so ranks never overlap and together cover the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from deltatune.data.collate import Row, collate

__all__ = ["BatchStream"]


class BatchStream:
    """Endless stream of collated micro-batches over `rows`, epoch after epoch.

    Rows that do not fill a last micro-batch for every rank are dropped from that epoch (they
    come first in another epoch's order).
    """

    def __init__(
        self,
        rows: Sequence[Row],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        collate_fn: Callable[[Sequence[Any], int], Any] = collate,
    ) -> None:
        if len(rows) < batch_size * world_size:
            batch_size = max(1, len(rows) // world_size)
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.collate_fn = collate_fn
        """(items, pad_id) -> batch; `collate` for Rows, another for other kinds of rows."""
        self.epoch, self.index = 0, 0
        """Position: the next micro-batch is number `index` (per rank) of epoch `epoch`."""
        self._order_cache: tuple[int, list[int]] = (-1, [])

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank takes per epoch."""
        return len(self.rows) // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> list[int]:
        if self._order_cache[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(len(self.rows), generator=generator).tolist()
            else:
                order = list(range(len(self.rows)))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        start = (self.index * self.world_size + self.rank) * self.batch_size
        self.index += 1
        return self.collate_fn([self.rows[i] for i in order[start : start + self.batch_size]], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(
    rows: Sequence[Row], batch_size: int, pad_id: int, collate_fn: Callable[[Sequence[Any], int], Any] = collate
) -> Iterator[dict[str, torch.Tensor]]:
    """Every row once, in order, in batches (the last may be smaller)."""
    for start in range(0, len(rows), batch_size):
        yield collate_fn(rows[start : start + batch_size], pad_id)
