"""Deterministic, resumable batching.

The order of an epoch is a permutation drawn from (seed, epoch) alone, so a run resumed from
`{"epoch": e, "index": i}` sees exactly the batches an uninterrupted run would have seen. With
several processes, each rank takes every `world_size`-th batch-sized slice of the permutation,
so ranks never overlap and together cover the epoch. The saved position also counts the rows of
the epoch consumed by all ranks together, so a run can resume with another number of processes.

Rows are `Row`s collated by `collate` unless a stage passes its own rows and `collate_fn(rows,
epoch)` (classification rows, MLM masking that depends on the epoch, preference pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from deltatune.data.collate import Row, collate
from deltatune.errors import DataError, TrainingError

__all__ = ["BatchStream", "CollateFn", "eval_batches"]

CollateFn = Callable[[Sequence[Any], int], dict[str, torch.Tensor]]
"""(rows of one micro-batch, epoch) -> batch of tensors."""


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
        collate_fn: CollateFn | None = None,
    ) -> None:
        if len(rows) < batch_size * world_size:
            batch_size = max(1, len(rows) // world_size)
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.collate_fn = collate_fn or (lambda batch_rows, epoch: collate(batch_rows, pad_id))
        self.epoch, self.index = 0, 0
        """Position: the next micro-batch is number `index` (per rank) of epoch `epoch`."""
        self._order_cache: tuple[int, list[int]] = (-1, [])

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank takes per epoch."""
        return len(self.rows) // (self.batch_size * self.world_size)

    def shard(self, rank: int, world_size: int) -> None:
        """Take rank `rank`'s share of every epoch from now on (a no-op when already sharded so)."""
        if (rank, world_size) == (self.rank, self.world_size):
            return
        if len(self.rows) < world_size:
            raise DataError(f"{len(self.rows)} training rows cannot be shared by {world_size} processes")
        self.batch_size = min(self.batch_size, len(self.rows) // world_size)
        self.rank, self.world_size = rank, world_size

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
        return self.collate_fn([self.rows[i] for i in order[start : start + self.batch_size]], self.epoch)

    def state_dict(self) -> dict[str, int]:
        """The position; `rows` (of this epoch, all ranks together) does not depend on the world size."""
        return {"epoch": self.epoch, "index": self.index, "rows": self.index * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if "rows" in state:
            per_index = self.batch_size * self.world_size
            if state["rows"] % per_index:
                raise TrainingError(
                    f"the checkpoint stopped {state['rows']} rows into epoch {self.epoch}, which is not a whole number "
                    f"of micro-batches of batch_size x processes = {per_index}; resume with a batch size and "
                    "number of processes whose product divides it (e.g. the ones that wrote it)"
                )
            self.index = int(state["rows"]) // per_index


def eval_batches(
    rows: Sequence[Any], batch_size: int, pad_id: int, collate_fn: CollateFn | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Every row once, in order, in batches (the last may be smaller); `collate_fn` sees epoch 0."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield collate_fn(chunk, 0) if collate_fn else collate(chunk, pad_id)
