"""Diff pruning (Guo, Rush & Kim 2021, arXiv:2012.07463): a sparse, learned difference vector.

Each chosen weight W gets a task-specific difference, gated by a learned mask:

    W' = W + z * w,    z ~ HardConcrete(log_alpha)    (eq. 3-5; Louizos et al. 2018)

with w (initialised to 0, so the model is unchanged at step 0) and log_alpha trainable, both of
W's shape. During training z is sampled,

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clamp(s (zeta - gamma) + gamma, 0, 1)

(beta = 2/3, gamma = -0.1, zeta = 1.1); in eval mode z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1).
The training loss gets the expected L0 norm of the difference (eq. 6) times `l0_lambda`,

    R = l0_lambda * sum sigmoid(log_alpha - beta log(-gamma / zeta)),

as `Delta.regularizer()`. At the end of training the difference z * w is projected onto the L0
ball of the exact budget (section 3.2, "magnitude pruning"): only the `target_sparsity` fraction of
entries with the largest |z * w| stay nonzero. It is then saved sparsely (flat indices + values
per weight, peft_type DIFFPRUNE). The paper's second phase (fine-tuning the kept entries with the
mask fixed) is left to a second run: training continues on the projected support.
The structured (group) penalty of section 3.3 is not implemented.

Memory: w and log_alpha double the chosen weights (plus their optimizer state), as in the paper.
Merging adds the (eval-mode) difference into W; unmerging subtracts it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.deltas.base import Delta, DeltaConfig
from deltatune.deltas.inject import find_targets
from deltatune.deltas.layer import DeltaLayer, WrappedDelta, wrap
from deltatune.errors import UserError

__all__ = ["DiffPruneConfig", "DiffPrune", "DiffLinear", "hard_concrete", "expected_l0"]

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
"""Hard-concrete temperature and stretch interval (Louizos et al. 2018; the paper's values)."""
LOADED_LOG_ALPHA = 10.0
"""log_alpha of a loaded (projected) difference: its eval-mode gate is exactly 1."""


def hard_concrete(log_alpha: torch.Tensor, training: bool) -> torch.Tensor:
    """Gate z in [0, 1] of log_alpha's shape: a sample in training, the deterministic gate otherwise."""
    if training:
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """Expected number of nonzero gates: sum sigmoid(log_alpha - beta log(-gamma / zeta)) (eq. 6)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()


class DiffPruneConfig(DeltaConfig):
    method: Literal["diffprune"] = "diffprune"
    target: str | list[str] = "all-linear"
    """Linear modules whose weights get a difference vector: `all-linear`, a list of names, or a regex."""
    layers: list[int] | None = None
    """Only these transformer blocks (default: all)."""
    target_sparsity: float = Field(0.005, gt=0, le=1)
    """Fraction of the chosen weights left nonzero after the final projection (the paper: 0.5%)."""
    l0_lambda: float = Field(1.25e-7, ge=0)
    """Weight of the expected-L0 penalty per parameter (the paper: 1.25e-7)."""
    log_alpha_init: float = 5.0
    """Initial log_alpha: a high value starts every gate open (the paper's code uses 5)."""


class DiffLinear(DeltaLayer):
    """An nn.Linear whose weight gets named gated differences: x [..., in] -> (W + sum z * w) x + b."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.diff_w = nn.ParameterDict()
        self.diff_log_alpha = nn.ParameterDict()
        self.support: dict[str, torch.Tensor] = {}
        """Projected adapters: bool mask of the entries allowed to be nonzero."""

    def add_adapter(self, name: str, log_alpha_init: float) -> None:
        self.register_adapter(name)
        weight = self.base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.diff_w[name] = nn.Parameter(torch.zeros(weight.shape, device=weight.device, dtype=dtype))
        self.diff_log_alpha[name] = nn.Parameter(torch.full(weight.shape, log_alpha_init, device=weight.device, dtype=dtype))

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.merge_adapter(name, -1.0)
        super().remove_adapter(name)
        self.support.pop(name, None)

    def difference(self, name: str, training: bool = False) -> torch.Tensor:
        """z * w of adapter `name` (restricted to its support once projected), W's shape."""
        diff = hard_concrete(self.diff_log_alpha[name], training and name not in self.support) * self.diff_w[name]
        return diff * self.support[name] if name in self.support else diff

    def merge_adapter(self, name: str, sign: float) -> None:
        with torch.no_grad():
            self.base.weight.add_(self.difference(name).to(self.base.weight.dtype), alpha=sign)
        (self.merged_adapters.add if sign > 0 else self.merged_adapters.discard)(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.active_adapters()
        if not active:
            return self.base_layer(x)
        weight = self.base.weight
        for name in active:
            weight = weight + self.difference(name, self.training).to(weight.dtype)
        # The wrapped module (possibly another delta's wrapper) is bypassed: W' x + b, then what
        # the inner wrappers add on top of their base.
        out = F.linear(x, weight, self.base.bias)
        if isinstance(self.base_layer, DeltaLayer):
            out = out + (self.base_layer(x) - self.base(x))
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}"


class DiffPrune(WrappedDelta):
    """Diff pruning (Guo et al. 2021): a learned difference per chosen weight with hard-concrete L0 gates, projected to a sparse budget at the end; mergeable."""

    config_class = DiffPruneConfig
    layer_class = DiffLinear
    set_row_mask = Delta.set_row_mask  # DiffLinear applies to whole batches only
    mergeable = True
    config: DiffPruneConfig

    def _attach(self, model: nn.Module) -> None:
        cfg = self.config
        self.paths = find_targets(model, cfg.target, (nn.Linear,), cfg.layers)
        for path in self.paths:
            wrap(model, path, DiffLinear).add_adapter(self.name, cfg.log_alpha_init)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, layer in self.layers():
            yield f"{path}.diff_w.{self.name}", layer.diff_w[self.name]
            yield f"{path}.diff_log_alpha.{self.name}", layer.diff_log_alpha[self.name]

    # ---- training hooks ---------------------------------------------------------------------------
    @property
    def projected(self) -> bool:
        return all(self.name in layer.support for _, layer in self.layers())

    def regularizer(self) -> torch.Tensor | None:
        """l0_lambda * expected L0 norm of the difference (eq. 6); None once projected or with lambda 0."""
        if self.projected or self.config.l0_lambda == 0:
            return None
        return self.config.l0_lambda * torch.stack([expected_l0(layer.diff_log_alpha[self.name]) for _, layer in self.layers()]).sum()

    def nonzero(self) -> int:
        """Entries of the (eval-mode) difference that are nonzero."""
        with torch.no_grad():
            return sum(int(layer.difference(self.name).count_nonzero()) for _, layer in self.layers())

    def on_train_end(self) -> None:
        self.project()

    def project(self) -> None:
        """Keep the `target_sparsity` fraction of entries with the largest |z * w| over all chosen
        weights (one global budget, the paper's L0-ball projection); the rest become 0 for good."""
        with torch.no_grad():
            diffs = [(layer, layer.difference(self.name).abs()) for _, layer in self.layers()]
            total = sum(d.numel() for _, d in diffs)
            budget = max(1, math.ceil(self.config.target_sparsity * total))
            flat = torch.cat([d.flatten() for _, d in diffs])
            # The budget-th largest magnitude; ties at the threshold are broken by position so exactly `budget` stay.
            keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
            keep[torch.topk(flat, budget, sorted=False).indices] = True
            offset = 0
            for layer, d in diffs:
                mask = keep[offset : offset + d.numel()].view(d.shape)
                offset += d.numel()
                if self.merged:
                    layer.merge_adapter(self.name, -1.0)
                layer.support[self.name] = mask
                if self.merged:
                    layer.merge_adapter(self.name, 1.0)

    # ---- on-disk format: sparse ---------------------------------------------------------------------
    def export_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per weight: `<module>.diff_indices` (flat int64 positions) and `<module>.diff_values` of
        the eval-mode difference (from `state`'s tensors when given)."""
        out = {}
        with torch.no_grad():
            for path, layer in self.layers():
                if state is None:
                    diff = layer.difference(self.name).flatten()
                else:
                    w, log_alpha = state[f"{path}.diff_w.{self.name}"], state[f"{path}.diff_log_alpha.{self.name}"]
                    diff = hard_concrete(log_alpha, training=False) * w
                    if self.name in layer.support:
                        diff = diff * layer.support[self.name].to(diff.device)
                    diff = diff.flatten()
                index = diff.nonzero().flatten()
                out[f"base_model.model.{path}.diff_indices"] = index.to(torch.int64)
                out[f"base_model.model.{path}.diff_values"] = diff[index].contiguous()
        return out

    def import_state(self, stored: dict[str, torch.Tensor], source: str = "adapter") -> None:
        with torch.no_grad():
            for path, layer in self.layers():
                key = f"base_model.model.{path}"
                if f"{key}.diff_indices" not in stored or f"{key}.diff_values" not in stored:
                    raise UserError(f"{source}: the difference for {path} is missing; was it saved from another base model?")
                index, values = stored[f"{key}.diff_indices"].long(), stored[f"{key}.diff_values"]
                w = layer.diff_w[self.name]
                if index.numel() and int(index.max()) >= w.numel() or index.shape != values.shape:
                    raise UserError(f"{source}: the difference for {path} does not fit its weight of shape {tuple(w.shape)}")
                w.zero_()
                w.view(-1)[index] = values.to(w.dtype)
                layer.diff_log_alpha[self.name].fill_(LOADED_LOG_ALPHA)
                support = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
                support[index] = True
                layer.support[self.name] = support.view(w.shape)
