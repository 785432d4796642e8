"""Layer freezing and gradual unfreezing.

Early layers hold general features, later ones task-specific ones (the seeds; Yosinski et al.
2014), so the bottom of the network stays frozen and the top trains: `trainable_layers: 4` trains
the top 4 transformer blocks (the blocks are the numbered children `layers.N`, `layer.N`, `h.N`,
`blocks.N`), `frozen_layers: 6` freezes the first 6 and trains the rest; with neither, the top 2
train (LLaMA-Factory's default). Around the blocks, the *head* is every parameter after the last
block (final norm, pooler, task head, an untied LM head) and the *embeddings* every parameter
before the first. `trainable` / `frozen` regexes add or remove parameters by name.

Gradual unfreezing (ULMFiT, Howard & Ruder 2018, section 3.2): with `unfreeze_every: K` only the
head trains for the first K steps, then every K steps one more group of `unfreeze_group` blocks
from the top joins, until all selected blocks (and, with `embeddings: true`, the embeddings) train.
The trainable set is a pure function of the step (`on_step`), so a resumed run continues exactly;
the optimizer holds every parameter from the start and skips those without a gradient.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.inject import layer_index
from deltatune.deltas.select import SelectDelta
from deltatune.errors import ConfigError, UserError

__all__ = ["FreezeConfig", "Freeze", "parameter_regions"]


class FreezeConfig(DeltaConfig):
    method: Literal["freeze"] = "freeze"
    trainable_layers: int | None = Field(None, ge=0)
    """Train the top N blocks (default 2 when `frozen_layers` is unset)."""
    frozen_layers: int | None = Field(None, ge=0)
    """Freeze the first N blocks and train the others (instead of `trainable_layers`)."""
    head: bool = True
    """Train the parameters after the last block: final norm, pooler, task head, and the LM head
    unless it is tied to the input embeddings."""
    embeddings: bool = False
    """Train the parameters before the first block (input embeddings, and an LM head tied to them)."""
    trainable: list[str] = Field(default_factory=list)
    """Regexes searched in parameter names: matching parameters train too (e.g. `norm`)."""
    frozen: list[str] = Field(default_factory=list)
    """Regexes searched in parameter names: matching parameters stay frozen whatever selected them."""
    unfreeze_every: int | None = Field(None, ge=1)
    """Gradual unfreezing: train the head alone for this many steps, then unfreeze one more group of
    blocks from the top every this many steps."""
    unfreeze_group: int = Field(1, ge=1)
    """Blocks per group for gradual unfreezing."""
    keep_base: bool = True
    """Keep a copy of the trained parameters' original values so `disabled()` gives the base model."""

    @model_validator(mode="after")
    def _check(self) -> FreezeConfig:
        if self.trainable_layers is not None and self.frozen_layers is not None:
            raise ValueError("give trainable_layers or frozen_layers, not both")
        return self


def parameter_regions(model: nn.Module) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """(before, blocks, after): parameter names before the first block, per block index, and after
    the last block, in the model's order (tied parameters once)."""
    before, blocks, after = [], {}, []
    for name, _ in model.named_parameters():
        index = layer_index(name)
        if index is not None:
            blocks.setdefault(index, []).append(name)
        elif blocks:
            after.append(name)
        else:
            before.append(name)
    return before, blocks, after


class Freeze(SelectDelta):
    """Layer freezing: the top blocks and the head train, the rest stays frozen; optional gradual unfreezing from the top (ULMFiT)."""

    config_class = FreezeConfig
    config: FreezeConfig

    def select(self, model: nn.Module) -> list[str]:
        cfg = self.config
        before, blocks, after = parameter_regions(model)
        if not blocks:
            raise ConfigError(
                "delta freeze: found no numbered blocks (layers.N, layer.N, h.N, blocks.N) in this model; "
                "select parameters with delta.trainable regexes instead"
            )
        order = sorted(blocks, reverse=True)  # top first
        if cfg.frozen_layers is not None:
            top = [i for i in order if i >= cfg.frozen_layers]
        else:
            top = order[: 2 if cfg.trainable_layers is None else cfg.trainable_layers]
        extra = [n for n in (before + after + [p for b in blocks.values() for p in b]) if any(re.search(r, n) for r in cfg.trainable)]
        # Groups in the order gradual unfreezing turns them on: head (+ regex picks), blocks from the top, embeddings.
        groups = [(after if cfg.head else []) + extra]
        group = max(1, cfg.unfreeze_group)
        groups += [[p for i in top[g : g + group] for p in blocks[i]] for g in range(0, len(top), group)]
        groups.append(before if cfg.embeddings else [])
        keep = lambda n: not any(re.search(r, n) for r in cfg.frozen)  # noqa: E731
        seen: set[str] = set()
        self.groups = []
        for g in groups:
            g = [n for n in dict.fromkeys(g) if keep(n) and n not in seen]
            seen.update(g)
            if g:
                self.groups.append(g)
        if not self.groups:
            raise ConfigError("delta freeze: this selection trains no parameters; raise trainable_layers or set head: true")
        return [n for g in self.groups for n in g]

    def attach(self, model: nn.Module) -> Delta:
        super().attach(model)
        self.on_step(1)  # the state before the first step (head only, under gradual unfreezing)
        return self

    def active_groups(self, step: int) -> int:
        """How many groups train at optimizer step `step` (1-based)."""
        every = self.config.unfreeze_every
        return len(self.groups) if every is None else min(len(self.groups), (max(step, 1) - 1) // every + 1)

    def on_step(self, step: int) -> None:
        if self.config.unfreeze_every and _distributed():
            raise UserError(
                "delta.unfreeze_every (gradual unfreezing) needs a single process: DDP and FSDP fix the "
                "trainable parameters when they wrap the model. Train with one process, or drop unfreeze_every."
            )
        active = self.active_groups(step)
        params = self.selection.params
        for i, group in enumerate(self.groups):
            for name in group:
                params[name].requires_grad_(i < active)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
