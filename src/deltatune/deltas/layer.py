"""`DeltaLayer`: the wrapper a reparameterizing delta puts around one base module.

The wrapper keeps the original module as `base_layer` (so its parameter names become
`<path>.base_layer.weight`, as in PEFT) and holds each named adapter's parameters in
`nn.ModuleDict`/`nn.ParameterDict` attributes keyed by adapter name. Several adapters can live on
one wrapper; each is active, disabled or merged independently, and may be limited to some rows of
the batch (`row_masks`, for mixed-adapter batches).

Wrappers of different methods on one module nest (LoRA + BitFit on `q_proj`: the BitFit wrapper's
`base_layer` is the LoRA wrapper); `base` is always the innermost original module, and
`find_layer` / `wrap` / `unwrap_adapter` find, add and remove one method's wrapper in a chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

from deltatune.deltas.base import Delta

__all__ = ["DeltaLayer", "find_layer", "wrap", "unwrap_adapter", "innermost"]

L = TypeVar("L", bound="DeltaLayer")


def innermost(module: nn.Module) -> nn.Module:
    """The original module under any number of wrappers."""
    while isinstance(module, DeltaLayer):
        module = module.base_layer
    return module


class DeltaLayer(nn.Module):
    """Base for wrappers; subclasses add adapter parameters and a `forward`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_names: list[str] = []
        """Adapters added to this layer, in order."""
        self.disabled_adapters: set[str] = set()
        self.merged_adapters: set[str] = set()
        self.row_masks: dict[str, torch.Tensor] = {}
        """Adapter -> [batch] bool: rows the adapter applies to (mixed-adapter batches); absent: all rows."""

    @property
    def base(self) -> nn.Module:
        """The original module (innermost when wrappers nest)."""
        return innermost(self.base_layer)

    def register_adapter(self, name: str) -> None:
        if name in self.adapter_names:
            raise ValueError(f"adapter '{name}' already exists on this layer; pick another name")
        self.adapter_names.append(name)

    def active_adapters(self) -> list[str]:
        """Adapters whose unmerged path runs in `forward`."""
        return [a for a in self.adapter_names if a not in self.disabled_adapters and a not in self.merged_adapters]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Parameters of adapter `name`, keyed by their name relative to this layer."""
        out = {}
        for key, param in self.named_parameters():
            if key.startswith("base_layer."):
                continue
            parts = key.split(".")
            if name in parts[1:]:
                out[key] = param
        return out

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name`'s parameters from this layer."""
        for attr in list(vars(self)["_modules"].values()):
            if isinstance(attr, nn.ModuleDict | nn.ParameterDict) and name in attr:
                del attr[name]
        self.adapter_names.remove(name)
        self.disabled_adapters.discard(name)
        self.merged_adapters.discard(name)
        self.row_masks.pop(name, None)

    def add_rows(
        self, name: str, out: torch.Tensor, update: torch.Tensor, otherwise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`out + update` on the rows adapter `name` applies to (all rows unless a mixed batch gave it
        a row mask), `out + otherwise` (or `out`) on the others. Rows are the first dimension."""
        mask = self.row_masks.get(name)
        if mask is None:
            return out + update.to(out.dtype)
        mask = mask.view(-1, *([1] * (out.dim() - 1))).to(out.device)
        rest = out if otherwise is None else out + otherwise.to(out.dtype)
        return torch.where(mask, out + update.to(out.dtype), rest)

    # Code outside the wrapper (weight tying, dtype checks, generation utilities) reads these.
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias


def find_layer(model: nn.Module, path: str, cls: type[L]) -> L | None:
    """The wrapper of type `cls` in the chain at `path`, if any."""
    module = model.get_submodule(path)
    while isinstance(module, DeltaLayer):
        if isinstance(module, cls):
            return module
        module = module.base_layer
    return None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def wrap(model: nn.Module, path: str, cls: type[L]) -> L:
    """The `cls` wrapper at `path`: the existing one, or a new one around whatever is there now."""
    layer = find_layer(model, path, cls)
    if layer is None:
        layer = cls(model.get_submodule(path))
        _set(model, path, layer)
    return layer


def unwrap_adapter(model: nn.Module, path: str, cls: type[DeltaLayer], name: str) -> None:
    """Remove adapter `name` from the `cls` wrapper at `path`; take the wrapper out of the chain
    when no adapter is left on it."""
    layer = find_layer(model, path, cls)
    if layer is None or name not in layer.adapter_names:
        return
    layer.remove_adapter(name)
    if layer.adapter_names:
        return
    outer = model.get_submodule(path)
    if outer is layer:
        _set(model, path, layer.base_layer)
        return
    while outer.base_layer is not layer:
        outer = outer.base_layer
    outer.base_layer = layer.base_layer


class WrappedDelta(Delta):
    """A delta that lives as named adapters inside `layer_class` wrappers at `self.paths` (LoRA,
    IA3, diff pruning): enabling, merging, row masks and removal are the same loop over them."""

    layer_class: type[DeltaLayer] = DeltaLayer
    paths: list[str]

    def layers(self) -> Iterator[tuple[str, DeltaLayer]]:
        assert self.model is not None, "attach the delta first"
        for path in self.paths:
            yield path, find_layer(self.model, path, self.layer_class)

    def set_enabled(self, enabled: bool) -> None:
        for _, layer in self.layers():
            (layer.disabled_adapters.discard if enabled else layer.disabled_adapters.add)(self.name)

    def _merge(self, sign: float) -> None:
        for _, layer in self.layers():
            layer.merge_adapter(self.name, sign)

    def set_row_mask(self, mask: torch.Tensor | None) -> None:
        for _, layer in self.layers():
            if mask is None:
                layer.row_masks.pop(self.name, None)
            else:
                layer.row_masks[self.name] = mask

    def remove(self) -> None:
        assert self.model is not None
        for path in self.paths:
            unwrap_adapter(self.model, path, self.layer_class, self.name)
        self.model, self.merged = None, False
