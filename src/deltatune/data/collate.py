"""Sequence packing and batch collation.

Packing puts several short examples into one row of at most `max_length` tokens, so no compute
is spent on padding. Each document's `position_ids` restart at 0; the model then attends only
within a document (transformers builds a block-diagonal causal mask from restarting position ids
when no attention mask is given, and FlashAttention uses them as sequence boundaries). Every
document's first label is IGNORE, so no token is predicted across a document boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deltatune.data.tokenize import IGNORE, Tokenized

__all__ = ["Row", "pack", "as_rows", "collate", "one_row"]


@dataclass(frozen=True)
class Row:
    """One training row: one example, or several packed ones."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Set for packed rows (restarting per document); None for a single example."""

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def as_rows(examples: Sequence[Tokenized]) -> list[Row]:
    """One row per example (no packing)."""
    return [Row(ex.input_ids, ex.labels) for ex in examples]


def pack(examples: Sequence[Tokenized], max_length: int) -> list[Row]:
    """First-fit-decreasing packing of examples into rows of at most `max_length` tokens.

    Deterministic for a given input order. Examples keep their token order; each starts a
    new document (positions restart at 0).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        slot = next((b for b, free in enumerate(space) if free >= n), None)
        if slot is None:
            bins.append([i])
            space.append(max_length - n)
        else:
            bins[slot].append(i)
            space[slot] -= n
    rows = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in members:
            ids += examples[i].input_ids
            labels += examples[i].labels
            positions += list(range(len(examples[i].input_ids)))
        rows.append(Row(ids, labels, positions))
    return rows


def one_row(rows: Sequence[Row]) -> list[Row]:
    """All documents of `rows` in a single packed row (padding-free batching, TRL's
    `padding_free`): with attention that splits rows into documents (models/packed_attention.py)
    a row's length costs nothing, so no row is padded to the longest."""
    ids, labels, positions = [], [], []
    for row in rows:
        ids += row.input_ids
        labels += row.labels
        positions += row.position_ids if row.position_ids is not None else list(range(len(row.input_ids)))
    return [Row(ids, labels, positions)]


def collate(rows: Sequence[Row], pad_id: int, pad_to_multiple: int = 8, single_row: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch (or, with `single_row`, concatenate them into one: `one_row`).

    Returns input_ids [B, T], labels [B, T] (IGNORE on padding) and either attention_mask [B, T]
    (unpacked rows) or, for packed rows, position_ids [B, T] (padding forms its own dummy
    document) and token_mask [B, T] (1 on real tokens; not a model input).
    """
    if single_row:
        rows = one_row(rows)
    length = max(len(r.input_ids) for r in rows)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    packed = any(r.position_ids is not None for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        mask[b, :n] = 1
        if packed:
            positions[b, :n] = torch.tensor(row.position_ids if row.position_ids is not None else range(n))
            positions[b, n:] = torch.arange(length - n)
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "token_mask": mask}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
