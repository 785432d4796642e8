"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685).

A frozen linear map W (out x in) gets a trainable low-rank update:

    h = W x + (alpha / r) * B A dropout(x),    A: r x in,  B: out x r

A starts random (Kaiming-uniform, as PEFT, or Gaussian) and B at zero, so the model is unchanged
at step 0. With `rslora` (Kalajdzievski 2023) the scale is alpha / sqrt(r), which keeps the update's
size stable as r grows. Merging adds (alpha / r) * B A into W; unmerging subtracts it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.inject import find_targets, get_module, set_module
from deltatune.deltas.layer import DeltaLayer
from deltatune.deltas.lora_fused import lora_branch

__all__ = ["LoraConfig", "Lora", "LoraLinear"]


class LoraConfig(DeltaConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    """Rank of the update."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    target: str | list[str] = "all-linear"
    """Modules to adapt: `all-linear`, a list of names (`[q_proj, v_proj]`), or a regex."""
    layers: list[int] | None = None
    """Only adapt modules in these transformer blocks (default: all)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Initialisation of A (B is always zero): PEFT's Kaiming-uniform, or Gaussian with std 1/r."""


class LoraLinear(DeltaLayer):
    """`nn.Linear` with any number of named LoRA adapters.

    Shapes: x [..., in] -> [..., out]; lora_A[name]: Linear(in, r); lora_B[name]: Linear(r, out).
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: str) -> None:
        self.register_adapter(name)
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": torch.float32 if weight.dtype not in (torch.float32, torch.float64) else weight.dtype}
        self.lora_A[name] = nn.Linear(self.base_layer.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.base_layer.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha / r) * B A, shape [out, in], in the base weight's dtype."""
        update = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]
        return update.to(self.base_layer.weight.dtype)

    def merge_adapter(self, name: str, sign: float) -> None:
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta_weight(name), alpha=sign)
        if sign > 0:
            self.merged_adapters.add(name)
        else:
            self.merged_adapters.discard(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.active_adapters():
            a = self.lora_A[name].weight
            if torch.is_autocast_enabled():
                h = self.lora_dropout[name](x)
                out = out + (F.linear(F.linear(h, a), self.lora_B[name].weight) * self.scaling[name]).to(out.dtype)
                continue
            # one autograd node: keeps x (shared by q/k/v), a 1-byte mask and A h (deltas/lora_fused.py)
            p = getattr(self.lora_dropout[name], "p", 0.0)
            branch = lora_branch(x.to(a.dtype), a, self.lora_B[name].weight, self.scaling[name], p, self.training)
            out = out + branch.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}"


class Lora(Delta):
    """Low-rank adaptation (Hu et al. 2021): a trainable update (alpha/r)·B·A beside each targeted Linear; mergeable."""

    config_class = LoraConfig
    mergeable = True
    peft_type = "LORA"
    config: LoraConfig

    def _attach(self, model: nn.Module) -> None:
        cfg = self.config
        self.paths = find_targets(model, cfg.target, (nn.Linear,), cfg.layers)
        for path in self.paths:
            layer = get_module(model, path)
            if not isinstance(layer, LoraLinear):
                layer = LoraLinear(layer)
                set_module(model, path, layer)
            layer.add_adapter(self.name, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.init)

    def layers(self) -> Iterator[tuple[str, LoraLinear]]:
        assert self.model is not None, "attach the delta first"
        for path in self.paths:
            yield path, get_module(self.model, path)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, layer in self.layers():
            for key, param in layer.adapter_parameters(self.name).items():
                yield f"{path}.{key}", param

    def set_enabled(self, enabled: bool) -> None:
        for _, layer in self.layers():
            (layer.disabled_adapters.discard if enabled else layer.disabled_adapters.add)(self.name)

    def _merge(self, sign: float) -> None:
        for _, layer in self.layers():
            layer.merge_adapter(self.name, sign)

    def peft_config(self) -> dict[str, Any]:
        cfg = self.config
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in self.paths})
        # PEFT matches a list of names by suffix; when that would select other modules than ours
        # (a regex or `layers` picked a subset), write an exact regex instead.
        assert self.model is not None
        by_suffix = find_targets(self.model, leaf_names, (nn.Linear,))
        target: str | list[str] = leaf_names if sorted(by_suffix) == sorted(self.paths) else (
            "^(" + "|".join(p.replace(".", r"\.") for p in self.paths) + ")$"
        )
        return {
            "peft_type": "LORA",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": target,
            "use_rslora": cfg.rslora,
            "use_dora": False,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> LoraConfig:
        """Our config for a PEFT `adapter_config.json` of type LORA."""
        unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform") if peft.get(k)]
        if unsupported:
            from deltatune.errors import UserError

            raise UserError(f"this PEFT LoRA adapter uses {', '.join(unsupported)}, which deltatune cannot load yet")
        target = peft.get("target_modules") or "all-linear"
        return LoraConfig(
            r=peft["r"],
            alpha=peft.get("lora_alpha", 8),
            dropout=peft.get("lora_dropout", 0.0),
            target=sorted(target) if isinstance(target, list) else target,
            rslora=bool(peft.get("use_rslora", False)),
            init="gaussian" if peft.get("init_lora_weights") == "gaussian" else "kaiming",
        )
