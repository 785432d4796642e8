"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685), with DoRA, rsLoRA and PiSSA.

A frozen weight W (out x in) gets a trainable low-rank update:

    h = W x + s * B A dropout(x),    A: r x in,  B: out x r,  s = alpha / r

A starts random (Kaiming-uniform, as PEFT, or Gaussian with std 1/r) and B at zero, so the model
is unchanged at step 0. Variants:

- `rslora` (Kalajdzievski 2023): s = alpha / sqrt(r), which keeps the update's size stable as r grows.
- `use_dora` (DoRA, Liu et al. 2024, arXiv:2402.09353): the adapted weight is split into a
  trainable magnitude m (one per output row, initialised to ||W||_row) and a direction,
      W' = m * (W + s B A) / ||W + s B A||_row,
  with the norm treated as a constant in the backward pass (the paper's section 4.3, as PEFT).
- `init: pissa` (PiSSA, Meng et al. 2024, arXiv:2404.02948): A and B start from the top-r singular
  triplets of W (B A = U_r S_r V_r^T / s) and the base keeps the residual W - s B A, so the output
  is unchanged at step 0 but training moves the principal directions. Disabling a PiSSA adapter
  uses its initial factors, so `disabled()` still gives the original model. On disk it is written
  as a plain LoRA of rank 2r on the original base (A' = [A; A0], B' = [B, -B0]), as PEFT converts it.
- `nn.Embedding` (A: r x num_embeddings, B: dim x r, A starts at zero and B Gaussian, as PEFT) and
  `nn.Conv2d` (A: a conv with the base's kernel/stride/padding to r channels, B: a 1x1 conv).
- `rank_pattern` / `alpha_pattern`: per-module rank and alpha, keyed by a regex matched against the
  end of the module path (PEFT's rule).

Merging adds s B A into W (DoRA: writes m * (W + s B A) / ||W + s B A||); unmerging restores W.
A LoRA on an input embedding that is tied to the output layer cannot be merged (the head would
change too), so such a delta reports `mergeable = False`.
"""

from __future__ import annotations

import math
import re
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from deltatune.deltas.base import DeltaConfig
from deltatune.deltas.inject import find_targets
from deltatune.deltas.layer import DeltaLayer, WrappedDelta, innermost, wrap
from deltatune.deltas.lora_fused import lora_branch
from deltatune.errors import ConfigError, UserError
from deltatune.models.quantize import QuantizedLinear

__all__ = ["LoraConfig", "Lora", "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv2d", "pattern_value"]


class LoraConfig(DeltaConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    """Rank of the update."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA branch's input (not used for embeddings, as in PEFT)."""
    target: str | list[str] = "all-linear"
    """Modules to adapt: `all-linear` (every nn.Linear but the output layer and task heads), a list
    of names (`[q_proj, v_proj]`, `embed_tokens`, `conv1`: Linear, Embedding and Conv2d modules), or
    a regex matching the whole module path."""
    layers: list[int] | None = None
    """Only adapt modules in these transformer blocks (default: all)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    """Initialisation: `kaiming` (PEFT's default: A Kaiming-uniform, B zero), `gaussian` (A with std
    1/r), or `pissa` (A, B from the principal singular vectors of W; the base keeps the residual)."""
    use_dora: bool = False
    """DoRA: learn a per-output magnitude and a LoRA-updated direction (nn.Linear targets)."""
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    """Per-module rank: `{regex: r}`, the regex matched against the end of the module path (PEFT's rule)."""
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    """Per-module alpha, matched like `rank_pattern`."""

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if self.use_dora and self.init == "pissa":
            raise ValueError("use_dora with init: pissa is not supported; pick one")
        return self


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first pattern matching the end of `path` (PEFT's `get_pattern_key` rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class LoraLayer(DeltaLayer, metaclass=ABCMeta):
    """A module with any number of named LoRA adapters; subclasses define the branch per module type.

    Factors are kept as 2-D matrices in `factors`: A [r, fan_in], B [fan_out, r], so the update of
    the weight is `to_weight(B @ A) * s` for every module type.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """PiSSA adapters: their initial (A, B), the principal part taken out of the base weight."""
        self._merge_norms: dict[str, torch.Tensor] = {}

    # ---- per module type (LoraLinear, LoraEmbedding, LoraConv2d) ------------------------------
    @abstractmethod
    def _create(self, name: str, r: int, factory: dict[str, Any]) -> None:
        """Register adapter `name`'s rank-r factor parameters (`factory`: device and dtype)."""

    @abstractmethod
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, fan_in], B [fan_out, r]) of adapter `name`, as views of its parameters."""

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Overwrite adapter `name`'s factors with 2-D A [r, fan_in], B [fan_out, r] (same r)."""
        cur_a, cur_b = self.factors(name)
        with torch.no_grad():
            cur_a.copy_(a.reshape(cur_a.shape))
            cur_b.copy_(b.reshape(cur_b.shape))

    def to_weight(self, update: torch.Tensor) -> torch.Tensor:
        """A [fan_out, fan_in] update in the base weight's layout."""
        return update.reshape(self.base.weight.shape)

    @abstractmethod
    def branch(self, name: str, x: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """s * B A x for adapter `name` (with other factors `a`, `b` when given: PiSSA's initial ones)."""

    def _cast(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The input in the adapter's dtype (autocast does it itself)."""
        return x if torch.is_autocast_enabled() or not x.is_floating_point() else x.to(self.factors(name)[0].dtype)

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout[name](self._cast(name, x))

    # ---- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: str = "kaiming", dora: bool = False
    ) -> None:
        self.register_adapter(name)
        # a quantized base would rebuild its whole weight for `.weight`: its fp32 scales tell the same
        weight = self.base.weight_scale if isinstance(self.base, QuantizedLinear) else self.base.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32}
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        self._create(name, r, factory)
        if init == "gaussian" and not isinstance(self, LoraEmbedding):  # PEFT keeps its embedding init here
            with torch.no_grad():
                self.factors(name)[0].normal_(std=1 / r)
        if init == "pissa":
            self._pissa_init(name, r)
        if dora:
            with torch.no_grad():
                norm = self.base.weight.detach().float().flatten(1).norm(dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(**factory))

    def _pissa_init(self, name: str, r: int) -> None:
        """W = U S V^T: A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s); W_res = W - s B A (PiSSA, eq. 2-3)."""
        weight = self.base.weight
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.detach().float().flatten(1), full_matrices=False)
            root = torch.sqrt(s[:r] / self.scaling[name])
            a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
            self.set_factors(name, a, b)
            weight.sub_(self.to_weight(b @ a * self.scaling[name]).to(weight.dtype))
        self.initial[name] = (a.clone(), b.clone())

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.merge_adapter(name, -1.0)
        if name in self.initial:  # give the base its principal part back
            a, b = self.initial.pop(name)
            with torch.no_grad():
                self.base.weight.add_(self.to_weight(b @ a * self.scaling[name]).to(self.base.weight.dtype))
        super().remove_adapter(name)
        self.scaling.pop(name, None)
        self._merge_norms.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A in the base weight's layout and dtype (before DoRA's normalisation)."""
        a, b = self.factors(name)
        return self.to_weight(b @ a * self.scaling[name]).to(self.base.weight.dtype)

    def _dora_scale(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """m / ||W + dW||_row: [fan_out], detached norm (DoRA section 4.3)."""
        norm = (self.base.weight + delta).flatten(1).norm(dim=1).detach()
        return self.lora_magnitude_vector[name] / norm

    def merge_adapter(self, name: str, sign: float) -> None:
        weight = self.base.weight
        with torch.no_grad():
            delta = self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                if sign > 0:
                    self._merge_norms[name] = (weight + delta).flatten(1).norm(dim=1)
                    factor = (self.lora_magnitude_vector[name] / self._merge_norms[name]).view(-1, *[1] * (weight.dim() - 1))
                    weight.copy_(factor * (weight + delta))
                else:
                    factor = (self.lora_magnitude_vector[name] / self._merge_norms.pop(name)).view(-1, *[1] * (weight.dim() - 1))
                    weight.copy_(weight / factor - delta)
            else:
                weight.add_(delta, alpha=sign)
        (self.merged_adapters.add if sign > 0 else self.merged_adapters.discard)(name)

    # ---- forward ------------------------------------------------------------------------------
    def _update(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output."""
        h = self._input(name, x)
        if name not in self.lora_magnitude_vector:
            return self.branch(name, h)
        # DoRA: m/||W + dW|| * (W h + s B A h) - W h, added to the base output (which has W x + bias).
        scale = self._dora_scale(name, self.delta_weight(name).detach())  # [out], broadcasts over [..., out]
        base = F.linear(h, self.base.weight)
        return (scale - 1) * base + scale * self.branch(name, h)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.adapter_names:
            if name in self.merged_adapters:
                continue
            initial = self.initial.get(name)
            rest = None
            if initial is not None and (name in self.disabled_adapters or name in self.row_masks):
                rest = self.branch(name, self._cast(name, x), *initial)
            if name in self.disabled_adapters:
                if rest is not None:  # PiSSA: the original model = residual base + initial factors
                    out = out + rest.to(out.dtype)
                continue
            out = self.add_rows(name, out, self._update(name, x, out), otherwise=rest)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}"


class LoraLinear(LoraLayer):
    """`nn.Linear` with LoRA adapters. Shapes: x [..., in] -> [..., out]; lora_A: Linear(in, r), lora_B: Linear(r, out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, r: int, factory: dict[str, Any]) -> None:
        base = self.base
        self.lora_A[name] = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def branch(self, name, x, a=None, b=None):
        a = self.lora_A[name].weight if a is None else a
        b = self.lora_B[name].weight if b is None else b
        return F.linear(F.linear(x, a), b) * self.scaling[name]

    def _update(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if name in self.lora_magnitude_vector or torch.is_autocast_enabled():
            return super()._update(name, x, out)
        # one autograd node: keeps x (shared by q/k/v), a 1-byte mask and A h (deltas/lora_fused.py)
        a, b = self.factors(name)
        p = getattr(self.lora_dropout[name], "p", 0.0)
        return lora_branch(self._cast(name, x), a, b, self.scaling[name], p, self.training)


class LoraEmbedding(LoraLayer):
    """`nn.Embedding` with LoRA adapters. ids [...] -> [..., dim]; lora_embedding_A [r, num], lora_embedding_B [dim, r]."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, r: int, factory: dict[str, Any]) -> None:
        base = self.base
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, base.num_embeddings, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(base.embedding_dim, r, **factory))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def to_weight(self, update: torch.Tensor) -> torch.Tensor:
        return update.T  # [dim, num] -> the embedding's [num, dim]

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x  # token ids: no dropout, as in PEFT

    def branch(self, name, x, a=None, b=None):
        a = self.lora_embedding_A[name] if a is None else a
        b = self.lora_embedding_B[name] if b is None else b
        base = self.base
        after_a = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return after_a @ b.T * self.scaling[name]


class LoraConv2d(LoraLayer):
    """`nn.Conv2d` with LoRA adapters: lora_A is a conv to r channels with the base's kernel, stride,
    padding and dilation; lora_B a 1x1 conv to the output channels. x [N, in, H, W] -> [N, out, H', W']."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        base = self.base
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ConfigError("LoRA on nn.Conv2d needs groups=1 and padding_mode='zeros'")

    def _create(self, name: str, r: int, factory: dict[str, Any]) -> None:
        base = self.base
        self.lora_A[name] = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **factory
        )
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight.flatten(1), self.lora_B[name].weight.flatten(1)

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a.reshape(self.lora_A[name].weight.shape))
            self.lora_B[name].weight.copy_(b.reshape(self.lora_B[name].weight.shape))

    def branch(self, name, x, a=None, b=None):
        conv_a, conv_b = self.lora_A[name], self.lora_B[name]
        wa = conv_a.weight if a is None else a.reshape(conv_a.weight.shape)
        wb = conv_b.weight if b is None else b.reshape(conv_b.weight.shape)
        h = F.conv2d(x, wa, None, conv_a.stride, conv_a.padding, conv_a.dilation)
        return F.conv2d(h, wb) * self.scaling[name]


_LAYERS: tuple[tuple[type[nn.Module], type[LoraLayer]], ...] = (
    (nn.Linear, LoraLinear),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv2d, LoraConv2d),
)


class Lora(WrappedDelta):
    """Low-rank adaptation (Hu et al. 2021): a trainable update (alpha/r)·B·A beside each targeted Linear, Embedding or Conv2d; DoRA, rsLoRA, PiSSA, per-module ranks; mergeable."""

    config_class = LoraConfig
    layer_class = LoraLayer
    mergeable = True
    peft_type = "LORA"
    config: LoraConfig

    def _attach(self, model: nn.Module) -> None:
        cfg = self.config
        types = (nn.Linear,) if cfg.target == "all-linear" else tuple(t for t, _ in _LAYERS)
        self.paths = find_targets(model, cfg.target, types, cfg.layers)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for path in self.paths:
            base = innermost(model.get_submodule(path))
            cls = next(layer for kind, layer in _LAYERS if isinstance(base, kind))
            if cls is not LoraLinear and (cfg.use_dora or cfg.init == "pissa"):
                raise ConfigError(f"delta lora: use_dora and init: pissa apply to nn.Linear only; {path} is {type(base).__name__}")
            if cls is LoraEmbedding and output is not None and output.weight is base.weight:
                self.mergeable = False  # merging would also change the tied output layer
            r = pattern_value(cfg.rank_pattern, path, cfg.r)
            alpha = pattern_value(cfg.alpha_pattern, path, cfg.alpha)
            wrap(model, path, cls).add_adapter(self.name, r, alpha, cfg.dropout, cfg.rslora, cfg.init, cfg.use_dora)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, layer in self.layers():
            for key, param in layer.adapter_parameters(self.name).items():
                yield f"{path}.{key}", param

    def merge(self) -> None:
        if not self.mergeable:
            raise TypeError("this LoRA adapts an input embedding tied to the output layer; merging it would change the head too")
        super().merge()

    # ---- on-disk format (PEFT's LoRA layout) ----------------------------------------------------
    def _ranks(self, factor: int = 1) -> tuple[int, float, dict[str, int], dict[str, float]]:
        cfg = self.config
        alpha_factor = factor if not cfg.rslora else math.sqrt(factor)
        return (
            cfg.r * factor,
            cfg.alpha * alpha_factor,
            {k: v * factor for k, v in cfg.rank_pattern.items()},
            {k: v * alpha_factor for k, v in cfg.alpha_pattern.items()},
        )

    def peft_config(self) -> dict[str, Any]:
        cfg = self.config
        assert self.model is not None
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in self.paths})
        # PEFT matches a list of names by suffix; when that would select other modules than ours
        # (a regex or `layers` picked a subset), write an exact regex instead.
        by_suffix = find_targets(self.model, leaf_names, tuple(t for t, _ in _LAYERS))
        target: str | list[str] = leaf_names if sorted(by_suffix) == sorted(self.paths) else (
            "^(" + "|".join(p.replace(".", r"\.") for p in self.paths) + ")$"
        )
        # A PiSSA adapter is written as the equivalent plain LoRA of rank 2r on the original base.
        r, alpha, rank_pattern, alpha_pattern = self._ranks(2 if cfg.init == "pissa" else 1)
        return {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": target,
            "use_rslora": cfg.rslora,
            "use_dora": cfg.use_dora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
        }

    def export_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        state = super().export_state(state)
        if self.config.init != "pissa":
            return state
        # [A; A0] and [B, -B0]: B' A' = B A - B0 A0, the change to the original weight (PEFT's conversion).
        for path, layer in self.layers():
            a0, b0 = layer.initial[self.name]
            key = f"base_model.model.{path}"
            state[f"{key}.lora_A.weight"] = torch.cat([state[f"{key}.lora_A.weight"], a0.to(state[f"{key}.lora_A.weight"].dtype)], 0)
            state[f"{key}.lora_B.weight"] = torch.cat([state[f"{key}.lora_B.weight"], -b0.to(state[f"{key}.lora_B.weight"].dtype)], 1)
        return state

    @classmethod
    def config_from_peft(cls, peft: dict[str, Any]) -> LoraConfig:
        """Our config for a PEFT `adapter_config.json` of type LORA."""
        unsupported = [
            k
            for k in ("modules_to_save", "lora_bias", "fan_in_fan_out", "layers_pattern", "target_parameters",
                      "trainable_token_indices", "layer_replication", "exclude_modules")
            if peft.get(k)
        ]
        init = peft.get("init_lora_weights", True)
        if init not in (True, False, "gaussian", "pissa"):
            unsupported.append(f"init_lora_weights={init!r}")
        if unsupported:
            raise UserError(f"this PEFT LoRA adapter uses {', '.join(unsupported)}, which deltatune cannot load yet")
        target = peft.get("target_modules") or "all-linear"
        layers = peft.get("layers_to_transform")
        return LoraConfig(
            r=peft["r"],
            alpha=peft.get("lora_alpha", 8),
            dropout=peft.get("lora_dropout", 0.0),
            target=sorted(target) if isinstance(target, list) else target,
            layers=[layers] if isinstance(layers, int) else layers,
            rslora=bool(peft.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "pissa" if init == "pissa" else "kaiming",
            use_dora=bool(peft.get("use_dora", False)),
            rank_pattern=peft.get("rank_pattern") or {},
            alpha_pattern=peft.get("alpha_pattern") or {},
        )
