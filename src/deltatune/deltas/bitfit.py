"""BitFit: train only the bias terms (Ben Zaken et al. 2021, arXiv:2106.10199), and the task head.

Every bias of the selected modules trains in place (attention, MLP, LayerNorm and convolution
biases) together with the task head when the model has one (`classifier`, `score`: the paper
trains the classification layer too). Llama-family models have no biases in their projections, so
BitFit would have almost nothing to train there: modules selected by `add_bias` that lack a bias
(default: every Linear but the output layer, i.e. the attention and MLP projections) get a
zero-initialised trainable bias, so the model is unchanged at step 0:

    h = W x + b_added,   b_added in R^out, initialised to 0

Merging folds an added bias into the Linear (creating its `bias` parameter); unmerging takes it
out again. On disk, existing biases keep their names and added ones are `<module>.bitfit_bias`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.inject import find_targets, layer_index
from deltatune.deltas.layer import DeltaLayer, find_layer, innermost, unwrap_adapter, wrap
from deltatune.deltas.select import Selection, find_head_modules, params_under
from deltatune.errors import ConfigError

__all__ = ["BitfitConfig", "Bitfit", "BiasLinear"]


class BitfitConfig(DeltaConfig):
    method: Literal["bitfit"] = "bitfit"
    target: str | list[str] = "all"
    """Modules whose existing biases train: `all`, a list of module names (`[query, intermediate.dense]`),
    or a regex matching the whole module path."""
    add_bias: str | list[str] | None = "all-linear"
    """Linear modules without a bias that get a zero-initialised trainable one: `all-linear` (every
    Linear but the output layer and heads), a list of names, a regex, or null for none."""
    head: bool = True
    """Also train the task head (classifier / score), as the paper does for classification."""
    layers: list[int] | None = Field(None)
    """Only these transformer blocks (default: all)."""


class BiasLinear(DeltaLayer):
    """A Linear without bias plus named trainable biases: x [..., in] -> W x + b [..., out]."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self._created_bias = False

    def add_adapter(self, name: str) -> None:
        self.register_adapter(name)
        weight = self.base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.bitfit_bias[name] = nn.Parameter(torch.zeros(self.base.out_features, device=weight.device, dtype=dtype))

    def merge_adapter(self, name: str, sign: float) -> None:
        base = self.base
        with torch.no_grad():
            if sign > 0:
                if base.bias is None:
                    base.bias = nn.Parameter(torch.zeros_like(base.weight[:, 0]), requires_grad=False)
                    self._created_bias = True
                base.bias.add_(self.bitfit_bias[name].to(base.bias.dtype))
                self.merged_adapters.add(name)
            else:
                base.bias.sub_(self.bitfit_bias[name].to(base.bias.dtype))
                self.merged_adapters.discard(name)
                if self._created_bias and not self.merged_adapters:
                    base.bias = None  # the module had no bias before the merge
                    self._created_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.active_adapters():
            out = self.add_rows(name, out, self.bitfit_bias[name])
        return out


class Bitfit(Delta):
    """BitFit (Ben Zaken et al. 2021): only biases and the task head train; bias-less Linears (Llama) get zero-initialised biases; mergeable."""

    config_class = BitfitConfig
    mergeable = True
    config: BitfitConfig

    def _attach(self, model: nn.Module) -> None:
        cfg = self.config
        names = self._existing_biases(model)
        if cfg.head:
            names += [n for n in params_under(model, find_head_modules(model)) if n not in names]
        self.selection = Selection(model, names)
        self.paths: list[str] = []
        if cfg.add_bias is not None:
            try:
                found = find_targets(model, cfg.add_bias, (nn.Linear,), cfg.layers)
            except ConfigError:
                if cfg.add_bias != "all-linear":
                    raise
                found = []  # a model whose only Linear is its head: nothing to add
            self.paths = [p for p in found if innermost(model.get_submodule(p)).bias is None]
        for path in self.paths:
            wrap(model, path, BiasLinear).add_adapter(self.name)

    def _existing_biases(self, model: nn.Module) -> list[str]:
        cfg = self.config
        modules = None if cfg.target == "all" else set(find_targets(model, cfg.target, (nn.Module,), cfg.layers))
        out = []
        for path, module in model.named_modules():
            if isinstance(module, DeltaLayer):
                continue  # its adapters' parameters are not the model's biases
            bias = module._parameters.get("bias")
            if bias is None or (modules is not None and re.sub(r"(\.base_layer)+$", "", path) not in modules):
                continue
            if cfg.layers is not None and layer_index(path) not in cfg.layers:
                continue
            out.append(f"{path}.bias" if path else "bias")
        return out

    def _layers(self) -> Iterator[tuple[str, BiasLinear]]:
        assert self.model is not None, "attach the delta first"
        for path in self.paths:
            yield path, find_layer(self.model, path, BiasLinear)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.selection.params.items()
        for path, layer in self._layers():
            yield f"{path}.bitfit_bias.{self.name}", layer.bitfit_bias[self.name]

    def set_enabled(self, enabled: bool) -> None:
        self.selection.set_original(not enabled, "bitfit")
        for _, layer in self._layers():
            (layer.disabled_adapters.discard if enabled else layer.disabled_adapters.add)(self.name)

    def _merge(self, sign: float) -> None:
        # The existing biases are trained in place (always "merged"); only added ones move.
        for _, layer in self._layers():
            layer.merge_adapter(self.name, sign)

    def remove(self) -> None:
        assert self.model is not None
        if self.merged:
            self.unmerge()
        self.selection.restore()
        for path in self.paths:
            unwrap_adapter(self.model, path, BiasLinear, self.name)
        self.model = None

