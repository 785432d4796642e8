"""Several named adapters on one base model: load, switch, disable, delete, combine, mixed batches.

    bank = Adapters(model)
    bank.load("runs/json/adapter", name="json")       # first one loaded is active
    bank.load("runs/sql/adapter", name="sql")         # loaded inactive
    bank.activate("sql")                              # only `sql` applies now
    with bank.disabled():                             # the base model
        ...
    bank.add_weighted({"json": 0.7, "sql": 0.3}, name="mix", combination="svd")  # a new LoRA adapter
    with bank.mixed_batch(["json", None, "sql"]):     # one adapter (or none) per example
        logits = model(input_ids).logits
    bank.delete("json")

Each adapter is a `DeltaSet` (one or more deltas attached under that name). Switching and mixed
batches work for methods whose layers keep adapters side by side (LoRA, IA3, and the methods that
implement `Delta.set_row_mask`); methods that train the model's own parameters in place (full,
freeze, bitfit's existing biases) cannot be told apart per example and say so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from deltatune.deltas import DeltaConfig, DeltaSet, attach
from deltatune.deltas.layer import find_layer
from deltatune.deltas.lora import Lora, LoraConfig, LoraLayer
from deltatune.errors import UserError

__all__ = ["Adapters", "combine_lora"]


class Adapters:
    """Named adapters (each a DeltaSet) on one base model; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sets: dict[str, DeltaSet] = {}
        self._active: list[str] = []

    @property
    def names(self) -> list[str]:
        return list(self.sets)

    @property
    def active(self) -> list[str]:
        return list(self._active)

    def __getitem__(self, name: str) -> DeltaSet:
        if name not in self.sets:
            raise KeyError(f"no adapter named {name!r}; adapters: {', '.join(self.sets) or '(none)'}")
        return self.sets[name]

    # ---- adding ---------------------------------------------------------------------------------
    def register(self, name: str, deltas: DeltaSet, activate: bool | None = None) -> DeltaSet:
        """Track `deltas` (already attached under `name`); active if `activate` (default: when it is the first)."""
        if name in self.sets:
            raise ValueError(f"an adapter named {name!r} exists already; delete it or pick another name")
        self.sets[name] = deltas
        self.activate(*(self._active + [name] if (activate if activate is not None else not self._active) else self._active))
        return deltas

    def add(self, name: str, configs: DeltaConfig | Sequence[DeltaConfig], activate: bool | None = None) -> DeltaSet:
        """Attach new deltas under `name` (the base and the other adapters are frozen)."""
        return self.register(name, attach(self.model, configs, name=name), activate)

    def load(self, directory: str | Path, name: str, activate: bool | None = None) -> DeltaSet:
        """Load a saved adapter directory (ours or PEFT's) under `name`."""
        from deltatune.export.peft_format import load_deltas  # export imports deltas: import here

        return self.register(name, load_deltas(self.model, directory, name=name), activate)

    # ---- switching ------------------------------------------------------------------------------
    def activate(self, *names: str) -> None:
        """Make exactly `names` apply (none: the base model); the others are disabled (unmerged first)."""
        for name in names:
            self[name]
        for name, deltas in self.sets.items():
            on = name in names
            for delta in deltas:
                if not on:
                    delta.unmerge()  # a no-op for deltas that train the weights in place
                delta.set_enabled(on)
        self._active = list(names)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block no adapter applies (the base model)."""
        previous = self.active
        self.activate()
        try:
            yield
        finally:
            self.activate(*previous)

    def delete(self, name: str) -> None:
        """Remove adapter `name` from the model for good."""
        deltas = self[name]
        for delta in reversed(deltas.deltas):
            delta.remove()
        del self.sets[name]
        self._active = [a for a in self._active if a != name]

    # ---- mixed batches --------------------------------------------------------------------------
    @contextmanager
    def mixed_batch(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i uses adapter `names[i]` only (None: the base model).

        Rows are the first dimension of every input (no beam search); results equal running each
        example alone with its adapter active."""
        for name in {n for n in names if n is not None}:
            self[name]
        previous = self.active
        self.activate(*self.sets)
        touched = []
        try:
            for set_name, deltas in self.sets.items():
                mask = torch.tensor([n == set_name for n in names], dtype=torch.bool)
                for delta in deltas:
                    delta.set_row_mask(mask)  # TypeError for methods that cannot route rows
                    touched.append(delta)
                    if delta.merged:
                        raise UserError(f"adapter {set_name!r} is merged into the weights; unmerge it for mixed batches")
            yield
        finally:
            for delta in touched:
                delta.set_row_mask(None)
            self.activate(*previous)

    # ---- combining ------------------------------------------------------------------------------
    def add_weighted(
        self,
        weights: dict[str, float],
        name: str,
        combination: Literal["linear", "cat", "svd"] = "svd",
        r: int | None = None,
        activate: bool = False,
    ) -> DeltaSet:
        """A new LoRA adapter `name` from a weighted combination of LoRA adapters (PEFT's
        `add_weighted_adapter`); see `combine_lora`."""
        sources = []
        for source, weight in weights.items():
            loras = [d for d in self[source] if isinstance(d, Lora)]
            if not loras:
                raise UserError(f"adapter {source!r} has no LoRA delta to combine")
            sources += [(lora, weight) for lora in loras]
        deltas = combine_lora(self.model, sources, name, combination, r)
        return self.register(name, deltas, activate)


def _factors(lora: Lora, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    a, b = layer.factors(lora.name)
    return a.detach(), b.detach(), layer.scaling[lora.name]


def combine_lora(
    model: nn.Module,
    sources: Sequence[tuple[Lora, float]],
    name: str,
    combination: Literal["linear", "cat", "svd"] = "svd",
    r: int | None = None,
) -> DeltaSet:
    """Attach a new LoRA `name` whose update at each module combines the sources' (weight w_i):

    - `cat`:    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: exactly sum_i w_i s_i B_i A_i,
                rank sum r_i;
    - `svd`:    the rank-`r` truncated SVD of sum_i w_i s_i B_i A_i (default r: the largest source rank);
    - `linear`: A = sum_i sqrt(|w_i s_i|) sign(w_i s_i) A_i, B = sum_i sqrt(|w_i s_i|) B_i (same ranks
                only; mixes the factors, not the products, as PEFT's `linear`).

    The new adapter has scale 1 (alpha = r at every module), as in PEFT."""
    if combination not in ("linear", "cat", "svd"):
        raise UserError(f"combination must be linear, cat or svd, not {combination!r}")
    for lora, _ in sources:
        if lora.config.use_dora or lora.config.init == "pissa":
            raise UserError(f"adapter {lora.name!r} uses DoRA or PiSSA, whose updates are not a plain B A; cannot combine it")
    paths = list(dict.fromkeys(p for lora, _ in sources for p in lora.paths))
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in paths:
        layer = find_layer(model, path, LoraLayer)
        parts = [(*_factors(lora, layer), w) for lora, w in sources if path in lora.paths]
        if combination == "cat":
            a = torch.cat([w * s * a for a, _, s, w in parts], 0)
            b = torch.cat([b for _, b, _, _ in parts], 1)
        elif combination == "linear":
            if len({a.shape[0] for a, _, _, _ in parts}) != 1:
                raise UserError(f"combination linear needs equal ranks; {path} has ranks {[a.shape[0] for a, *_ in parts]}")
            roots = [(math.copysign(math.sqrt(abs(w * s)), w * s), math.sqrt(abs(w * s))) for _, _, s, w in parts]
            a = sum(ra * a for (ra, _), (a, _, _, _) in zip(roots, parts, strict=True))
            b = sum(rb * b for (_, rb), (_, b, _, _) in zip(roots, parts, strict=True))
        else:
            update = sum(w * s * (b @ a) for a, b, s, w in parts)
            rank = r or max(a.shape[0] for a, *_ in parts)
            u, sv, vh = torch.linalg.svd(update.float(), full_matrices=False)
            a, b = vh[:rank].to(update.dtype), (u[:, :rank] * sv[:rank]).to(update.dtype)
        new[path] = (a, b)
    ranks = {path: a.shape[0] for path, (a, _) in new.items()}
    top = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items() if k != top}
    config = LoraConfig(
        r=top,
        alpha=top,
        dropout=0.0,
        target="^(" + "|".join(re.escape(p) for p in paths) + ")$",
        rank_pattern=pattern,
        alpha_pattern={k: float(v) for k, v in pattern.items()},
    )
    deltas = attach(model, config, name=name)
    for path, (a, b) in new.items():
        find_layer(model, path, LoraLayer).set_factors(name, a, b)
    return deltas
