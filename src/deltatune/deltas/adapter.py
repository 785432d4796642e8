"""Bottleneck adapters: Houlsby et al. 2019 (arXiv:1902.00751), Pfeiffer et al. 2020
(arXiv:2005.00247), parallel adapters (He et al. 2022, arXiv:2110.04366).

An adapter is a small bottleneck network with a residual connection:

    A(h) = W_up f(W_down h + b_down) + b_up,    W_down: m x d,  W_up: d x m,  m = d / reduction_factor

- `houlsby`: sequential, h <- h + A(h) on the output of the attention block and of the MLP;
- `pfeiffer`: the same after the MLP only (half the adapters, comparable quality);
- `parallel`: beside a sublayer, fed with the sublayer's *input* x and scaled:
  out = sublayer(x) + s * A(x) (s = 4 in He et al.); beside the MLP by default, `where` adds attention.

W_up and b_up start at zero, so every adapter outputs zero and the model computes exactly as the
base at step 0 (the seeds: initialise so the module's output resembles the original model);
W_down starts like a fresh nn.Linear (Kaiming-uniform), so W_up receives a gradient at once.

Wrap points are found by module name, with no per-architecture code: the sublayer's output
projection (an nn.Linear) is wrapped, so the adapter acts on its output before the residual add
(and before the LayerNorm of post-LN encoders), where Houlsby et al. place it:

| where | output projection (wrapped) | sublayer input (parallel only) |
|---|---|---|
| attention | `o_proj`, `out_proj`, `attention.output.dense` (BERT), `self_attention.dense` | `self_attn`, `attention`, `attn`, `self_attention` |
| mlp | `down_proj`, `fc2`, `output.dense` (BERT), `dense_4h_to_h`, `w2` | `mlp`, `intermediate` (BERT), `feed_forward`, `ffn` |

Not mergeable (a nonlinearity sits between the projections). On disk: the deltatune-only
peft_type `ADAPTER` with keys `base_model.model.<path>.adapter_down.weight` etc.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.inject import find_targets, layer_index, set_module
from deltatune.deltas.layer import DeltaLayer
from deltatune.errors import ConfigError

__all__ = ["AdapterConfig", "Adapter", "AdapterLayer", "OUTPUT_NAMES", "INPUT_NAMES"]

OUTPUT_NAMES = {
    "attention": ["o_proj", "out_proj", "attention.output.dense", "self_attention.dense"],
    "mlp": ["down_proj", "fc2", "output.dense", "dense_4h_to_h", "w2"],
}
"""Names of each sublayer's output projection (the wrapped nn.Linear)."""
INPUT_NAMES = {
    "attention": ["self_attn", "attention", "attn", "self_attention"],
    "mlp": ["mlp", "intermediate", "feed_forward", "ffn"],
}
"""Names of the module whose input is the sublayer's input (parallel adapters read it)."""

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterConfig(DeltaConfig):
    method: Literal["adapter"] = "adapter"
    variant: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    """`houlsby` (after attention and MLP), `pfeiffer` (after the MLP), `parallel` (beside the MLP, scaled)."""
    reduction_factor: float = Field(16.0, gt=0)
    """Bottleneck size m = model width / reduction_factor (ignored when `bottleneck` is set)."""
    bottleneck: int | None = Field(None, ge=1)
    """Bottleneck size m, overriding `reduction_factor`."""
    activation: Literal["relu", "gelu", "silu", "tanh"] | None = None
    """Nonlinearity f (default: silu for houlsby, relu for pfeiffer and parallel, as in AdapterHub)."""
    scaling: float | None = Field(None, gt=0)
    """Output scale s (default: 1, and 4 for parallel as in He et al.)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the bottleneck activations."""
    where: list[Literal["attention", "mlp"]] | None = None
    """Sublayers that get an adapter (default: the variant's: houlsby both, pfeiffer/parallel the MLP)."""
    target: dict[str, list[str]] | None = None
    """Override the module names of the wrap points, e.g. `{mlp: [my_ffn.out]}` (see the table in the docs)."""
    layers: list[int] | None = None
    """Only adapt these transformer blocks (default: all)."""

    def resolved(self) -> tuple[list[str], str, float]:
        """(where, activation, scaling) with the variant's defaults filled in."""
        where = self.where or (["attention", "mlp"] if self.variant == "houlsby" else ["mlp"])
        activation = self.activation or ("silu" if self.variant == "houlsby" else "relu")
        scaling = self.scaling or (4.0 if self.variant == "parallel" else 1.0)
        return where, activation, scaling


class AdapterLayer(DeltaLayer):
    """An output projection with bottleneck adapters applied to its output (see module doc).

    Shapes: x [..., in] -> [..., out]; adapter_down[name]: Linear(d, m); adapter_up[name]: Linear(m, out),
    with d = out (sequential) or the sublayer's input width (parallel).
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.sublayer_input: torch.Tensor | None = None
        """The sublayer's input of the current forward (set by a hook; parallel adapters read it)."""

    def add_adapter(self, name: str, d_in: int, m: int, activation: str, dropout: float, scaling: float, parallel: bool) -> None:
        self.register_adapter(name)
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": torch.float32 if weight.dtype not in (torch.float32, torch.float64) else weight.dtype}
        self.adapter_down[name] = nn.Linear(d_in, m, **factory)
        self.adapter_up[name] = nn.Linear(m, self.base_layer.out_features, **factory)
        self.adapter_act[name] = nn.Sequential(_ACTIVATIONS[activation](), nn.Dropout(dropout))
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)
        nn.init.zeros_(self.adapter_down[name].bias)
        self.parallel[name], self.scaling[name] = parallel, scaling

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.parallel.pop(name, None)
        self.scaling.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.active_adapters():
            source = self.sublayer_input if self.parallel[name] else out
            if source is None:
                raise RuntimeError(f"parallel adapter '{name}': the sublayer's input was not captured")
            down = self.adapter_down[name]
            h = self.adapter_act[name](down(source.to(down.weight.dtype) if not torch.is_autocast_enabled() else source))
            out = out + (self.adapter_up[name](h) * self.scaling[name]).to(out.dtype)
        self.sublayer_input = None
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}"


def _capture_input(layer: AdapterLayer):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        layer.sublayer_input = args[0] if args else kwargs["hidden_states"]

    return hook


class Adapter(Delta):
    """Bottleneck adapters at the attention and/or MLP outputs of every block (see module doc)."""

    config_class = AdapterConfig
    config: AdapterConfig

    def _attach(self, model: nn.Module) -> None:
        cfg = self.config
        where, activation, scaling = cfg.resolved()
        parallel = cfg.variant == "parallel"
        names = {sub: (cfg.target or {}).get(sub, OUTPUT_NAMES[sub]) for sub in OUTPUT_NAMES}
        # BERT's attention output `attention.output.dense` also ends in the MLP's `output.dense`.
        attention_outputs = set(_find(model, names["attention"], nn.Linear, cfg.layers))
        self.paths, self._hooks = [], []
        for sublayer in where:
            outputs = _find(model, names[sublayer], nn.Linear, cfg.layers)
            if sublayer == "mlp":
                outputs = [p for p in outputs if p not in attention_outputs]
            inputs = _inputs_by_layer(model, INPUT_NAMES[sublayer], outputs) if parallel else {}
            for path in outputs:
                layer = model.get_submodule(path)
                if not isinstance(layer, AdapterLayer):
                    layer = AdapterLayer(layer)
                    set_module(model, path, layer)
                width = layer.base_layer.out_features  # a sublayer maps [.., hidden] to [.., hidden]
                m = cfg.bottleneck or max(1, round(width / cfg.reduction_factor))
                if parallel:
                    hook = _capture_input(layer)
                    self._hooks.append(model.get_submodule(inputs[path]).register_forward_pre_hook(hook, with_kwargs=True))
                layer.add_adapter(self.name, width, m, activation, cfg.dropout, scaling, parallel)
                self.paths.append(path)
        if not self.paths:
            raise ConfigError(
                f"delta adapter: no {' or '.join(where)} output projection found by name "
                f"({', '.join(n for sub in where for n in names[sub])}); name them in delta.target"
            )

    def layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        assert self.model is not None, "attach the delta first"
        for path in self.paths:
            yield path, self.model.get_submodule(path)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, layer in self.layers():
            for key, param in layer.adapter_parameters(self.name).items():
                yield f"{path}.{key}", param

    def set_enabled(self, enabled: bool) -> None:
        for _, layer in self.layers():
            (layer.disabled_adapters.discard if enabled else layer.disabled_adapters.add)(self.name)

    def remove(self) -> None:
        """Drop this adapter; wrappers with no adapter left give their place back to the original module."""
        for handle in self._hooks:
            handle.remove()
        for path, layer in list(self.layers()):
            layer.remove_adapter(self.name)
            if not layer.adapter_names:
                set_module(self.model, path, layer.base_layer)
        self.paths, self._hooks = [], []


def _find(model: nn.Module, names: list[str], kind: type[nn.Module], layers: list[int] | None) -> list[str]:
    try:
        return find_targets(model, names, (kind,), layers)
    except ConfigError:
        return []


def _inputs_by_layer(model: nn.Module, names: list[str], outputs: list[str]) -> dict[str, str]:
    """For each output projection, the sublayer-input module of the same block that contains it."""
    candidates = [p for p, _ in model.named_modules() if any(p == n or p.endswith(f".{n}") for n in names)]
    found = {}
    for out in outputs:
        # The innermost candidate in the same block whose subtree holds the projection (Llama:
        # `mlp` holds `mlp.down_proj`), or else the one in the same block (BERT: `intermediate`
        # feeds `output.dense`, a sibling).
        same_block = [c for c in candidates if layer_index(c) == layer_index(out)]
        holding = [c for c in same_block if out.startswith(f"{c}.")]
        pick = max(holding, key=len) if holding else (same_block[0] if len(same_block) == 1 else None)
        if pick is None:
            raise ConfigError(
                f"delta adapter (parallel): cannot tell which module feeds {out}; "
                f"name it in delta.target (candidates: {same_block or 'none'})"
            )
        found[out] = pick
    return found
