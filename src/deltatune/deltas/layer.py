"""`DeltaLayer`: the wrapper a reparameterizing delta puts around one base module.

The wrapper keeps the original module as `base_layer` (so its parameter names become
`<path>.base_layer.weight`, as in PEFT) and holds each named adapter's parameters in
`nn.ModuleDict`/`nn.ParameterDict` attributes keyed by adapter name. Several adapters can live on
one wrapper; each is active, disabled or merged independently.
"""

from __future__ import annotations

from torch import nn

__all__ = ["DeltaLayer"]


class DeltaLayer(nn.Module):
    """Base for wrappers; subclasses add adapter parameters and a `forward`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_names: list[str] = []
        """Adapters added to this layer, in order."""
        self.disabled_adapters: set[str] = set()
        self.merged_adapters: set[str] = set()

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

    # Code outside the wrapper (weight tying, dtype checks, generation utilities) reads these.
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias
