"""(IA)3: "infused adapter by inhibiting and amplifying inner activations" (Liu et al. 2022,
arXiv:2205.05638, section 3.3).

Learned vectors rescale the keys, the values and the feed-forward block's inner activation:

    k' = l_k * (W_k x),   v' = l_v * (W_v x),   ffn: W_2 (l_ff * h),   l_* initialised to 1

so the model is unchanged at step 0. The feed-forward vector scales the *input* of the second
feed-forward projection (`down_proj` in Llama, the intermediate->output `output.dense` in BERT);
the others scale their module's output. Shapes follow PEFT (`ia3_l`: [out, 1] for an output
scaling, [1, in] for a feed-forward input), so adapters load in PEFT and back.

Merging multiplies the scaling into the weight (rows for k/v and their bias, columns for the
feed-forward input); unmerging divides it out (entries with a scale near 0 are restored from a
copy, so unmerge is exact). When another delta wraps the same module inside (IA)3, merging scales
only the base weight: merge that other delta first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from deltatune.deltas.base import DeltaConfig
from deltatune.deltas.inject import find_targets
from deltatune.deltas.layer import DeltaLayer, WrappedDelta, wrap
from deltatune.errors import UserError

__all__ = ["IA3Config", "IA3", "IA3Linear", "AUTO_TARGET", "AUTO_FEEDFORWARD"]

AUTO_FEEDFORWARD = r".*\.(down_proj|fc2|w2|dense_4h_to_h)|.*\.layer\.\d+\.output\.dense"
"""Second feed-forward projections: Llama/Mistral `down_proj`, OPT `fc2`, BERT's intermediate->output."""
AUTO_TARGET = r".*\.(k_proj|v_proj|key|value|k_lin|v_lin)|" + AUTO_FEEDFORWARD
"""Keys and values (Llama `k_proj`/`v_proj`, BERT `key`/`value`, DistilBERT `k_lin`/`v_lin`) + feed-forward."""

_SMALL = 1e-3  # |scale| below this: keep the original weight entries to unmerge exactly


class IA3Config(DeltaConfig):
    method: Literal["ia3"] = "ia3"
    target: str | list[str] = "auto"
    """Linear modules to rescale: `auto` (keys, values, feed-forward input), a list of names or a regex."""
    feedforward: str | list[str] = "auto"
    """Which targets are feed-forward layers, whose input (not output) is scaled: `auto`, a list of names or a regex."""
    layers: list[int] | None = None
    """Only these transformer blocks (default: all)."""


class IA3Linear(DeltaLayer):
    """An nn.Linear with named (IA)3 vectors: x [..., in] -> (W (x * l_ff)) * l_out."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def add_adapter(self, name: str, feedforward: bool) -> None:
        self.register_adapter(name)
        base = self.base
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=dtype))
        self.feedforward[name] = feedforward

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.merge_adapter(name, -1.0)
        super().remove_adapter(name)
        self.feedforward.pop(name, None)

    def _scale(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The vector for `like` ([rows, ..., dim]); 1 on rows a mixed batch keeps from this adapter."""
        scale = self.ia3_l[name].flatten().to(like.dtype)
        mask = self.row_masks.get(name)
        if mask is None:
            return scale
        mask = mask.view(-1, *([1] * (like.dim() - 1))).to(like.device)
        return torch.where(mask, scale, torch.ones_like(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.active_adapters()
        for name in active:
            if self.feedforward[name]:
                x = x * self._scale(name, x)
        out = self.base_layer(x)
        for name in active:
            if not self.feedforward[name]:
                out = out * self._scale(name, out)
        return out

    def merge_adapter(self, name: str, sign: float) -> None:
        base, feedforward = self.base, self.feedforward[name]
        scale = self.ia3_l[name].detach().flatten().to(base.weight.dtype)
        with torch.no_grad():
            if sign > 0:
                small = (scale.abs() < _SMALL).nonzero().flatten()
                weight_part = base.weight[:, small] if feedforward else base.weight[small]
                bias_part = base.bias[small] if base.bias is not None and not feedforward else None
                self._stash[name] = (small, weight_part.clone(), None if bias_part is None else bias_part.clone())
                factor = scale
            else:
                factor = 1.0 / torch.where(scale.abs() < _SMALL, torch.ones_like(scale), scale)
            base.weight.mul_(factor.view(1, -1) if feedforward else factor.view(-1, 1))
            if base.bias is not None and not feedforward:
                base.bias.mul_(factor)
            if sign < 0:
                small, weight_part, bias_part = self._stash.pop(name)
                if feedforward:
                    base.weight[:, small] = weight_part
                else:
                    base.weight[small] = weight_part
                    if bias_part is not None:
                        base.bias[small] = bias_part
        (self.merged_adapters.add if sign > 0 else self.merged_adapters.discard)(name)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}"


def _matches(path: str, spec: str | list[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith(f".{t}") for t in spec)


class IA3(WrappedDelta):
    """(IA)3 (Liu et al. 2022): learned vectors, initialised to 1, rescale keys, values and the feed-forward input; mergeable."""

    config_class = IA3Config
    layer_class = IA3Linear
    mergeable = True
    peft_type = "IA3"
    config: IA3Config

    def _attach(self, model: nn.Module) -> None:
        cfg = self.config
        target = AUTO_TARGET if cfg.target == "auto" else cfg.target
        feedforward = AUTO_FEEDFORWARD if cfg.feedforward == "auto" else cfg.feedforward
        self.paths = find_targets(model, target, (nn.Linear,), cfg.layers)
        self.ff_paths = [p for p in self.paths if _matches(p, feedforward)]
        for path in self.paths:
            wrap(model, path, IA3Linear).add_adapter(self.name, path in self.ff_paths)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, layer in self.layers():
            yield f"{path}.ia3_l.{self.name}", layer.ia3_l[self.name]

    # ---- on-disk format (PEFT's IA3 layout) -----------------------------------------------------
    def peft_config(self) -> dict[str, Any]:
        assert self.model is not None
        others = [p for p in self.paths if p not in self.ff_paths]
        leaves = sorted({p.rsplit(".", 1)[-1] for p in self.paths})
        ff_leaves = sorted({p.rsplit(".", 1)[-1] for p in self.ff_paths})
        # PEFT selects targets by name suffix and feed-forward layers by plain `endswith`; write
        # names when that selects exactly our modules, else exact regexes.
        exact = sorted(find_targets(self.model, leaves, (nn.Linear,))) == sorted(self.paths) and not any(
            p.endswith(leaf) for p in others for leaf in ff_leaves
        )
        regex = lambda paths: "^(" + "|".join(re.escape(p) for p in paths) + ")$" if paths else "^$"  # noqa: E731
        return {
            "peft_type": "IA3",
            "target_modules": leaves if exact else regex(self.paths),
            "feedforward_modules": ff_leaves if exact else regex(self.ff_paths),
            "init_ia3_weights": True,
            "fan_in_fan_out": False,
            "modules_to_save": None,
        }

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> IA3Config:
        """Our config for a PEFT `adapter_config.json` of type IA3."""
        unsupported = [k for k in ("modules_to_save", "fan_in_fan_out", "exclude_modules") if peft.get(k)]
        if unsupported:
            raise UserError(f"this PEFT IA3 adapter uses {', '.join(unsupported)}, which deltatune cannot load yet")
        target, ff = peft.get("target_modules"), peft.get("feedforward_modules")
        if not target:
            raise UserError("this PEFT IA3 adapter has no target_modules; deltatune needs them spelled out")
        return IA3Config(
            target=sorted(target) if isinstance(target, list) else target,
            feedforward=sorted(ff or []) if not isinstance(ff, str) else ff,
        )
