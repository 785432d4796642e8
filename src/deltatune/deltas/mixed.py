"""Mixed-adapter batches: one batch, each example with its own adapter (or none).

    a = attach(model, PromptConfig(), name="a")
    b = attach(model, PrefixConfig(), name="b")
    with mixed_batch([*a, *b], adapter_names=["a", "b", None]):
        model.generate(**batch)          # row 0 uses a, row 1 b, row 2 the base model

Inside the block every delta applies only to the rows named after it (`Delta.set_row_mask`); the
results equal running each example alone with its adapter. Prompt-style methods keep their virtual
tokens in every row but hide them from the rows of other adapters, and a row's positions count only
the virtual tokens it sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from deltatune.deltas.base import Delta

__all__ = ["mixed_batch"]


@contextmanager
def mixed_batch(deltas: Iterable[Delta], adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row i of each batch uses only the deltas named `adapter_names[i]` (None:
    the base model). Batches must have len(adapter_names) rows."""
    deltas = list(deltas)
    known = {d.name for d in deltas}
    unknown = sorted({n for n in adapter_names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"adapter_names {unknown} are not among the given deltas' names {sorted(known)}")
    try:
        for delta in deltas:
            delta.set_row_mask(torch.tensor([n == delta.name for n in adapter_names], dtype=torch.bool))
        yield
    finally:
        for delta in deltas:
            try:
                delta.set_row_mask(None)
            except TypeError:
                pass  # a delta that refused a mask above
