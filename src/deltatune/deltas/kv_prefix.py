"""Per-layer key/value prefixes inside attention: the machinery of `prefix` and `ptuning2`.

Transformers' attention layers call the function registered for `config._attn_implementation`
as `fn(module, query, key, value, attention_mask, **kwargs)`, after rotary embeddings and after
the KV-cache update. `PrefixHost` registers a wrapper around the model's implementation
(`deltatune_prefix_sdpa` around `sdpa`, `deltatune_prefix_eager` around `eager`) that puts each
source's prefix keys/values in front of `key`/`value` and widens the mask with columns every query
may attend to.

The prefix never enters the KV cache: the cache holds only real tokens, so generation works with
whatever cache class transformers uses. (Building the prefix as `past_key_values` ties prefix
tuning to the cache classes, which change between transformers versions: ANCHORS complaint #9.)

Real tokens' positions are shifted by the prefix length (a forward pre-hook on the backbone), as
if the prefix were k earlier tokens: this is what PEFT computes (its prefix is a KV cache of
length k), so adapters move between the two with equal outputs.

A source is any object with `enabled: bool`, `row_mask: Tensor | None` ([batch] bool, for mixed
batches), `num_virtual_tokens: int` and `prefix_states(dtype, device) -> Tensor` of shape
[num_layers, 2, kv_heads, num_virtual_tokens, head_dim] (index 0: keys, 1: values).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from deltatune.deltas.virtual import HOST_ATTR as PROMPT_HOST_ATTR
from deltatune.deltas.virtual import backbone_of, forward_kwargs, past_length
from deltatune.errors import ConfigError
from deltatune.models.packed_attention import PACKED_SDPA

__all__ = ["PrefixHost", "attention_shape", "attention_modules"]

_WRAPPED = "deltatune_prefix_"
_SUPPORTED = ("sdpa", "eager", PACKED_SDPA)
_HOST_ATTR = "_deltatune_prefix_host"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers model, in layer order: the modules that call
    the attention-function interface, recognised by their integer `layer_idx`."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "is_causal")]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no attention modules that use transformers' attention interface; "
            "prefix and ptuning2 need a transformers model (Llama-, BERT-like, ...)"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a transformers model's self-attention."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return len(attention_modules(model)), kv_heads, head_dim


def _inner_function(name: str, module: nn.Module) -> Callable:
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    # `eager` is not in the registry: every modeling file defines its own `eager_attention_forward`.
    return sys.modules[type(module).__module__].eager_attention_forward


def _prefixed_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered wrapper: prefix keys/values in front, then the wrapped implementation."""
    host: PrefixHost = getattr(module, _HOST_ATTR)
    if host.captured is not None:
        host.captured[host.layer_of[id(module)]] = (key, value)
    key, value, attention_mask = host.extend(module, query, key, value, attention_mask, kwargs)
    return _inner_function(host.inner, module)(module, query, key, value, attention_mask, **kwargs)


def _register(inner: str) -> str:
    name = _WRAPPED + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _prefixed_attention)
        # document-wise SDPA leaves packed rows unmasked and splits them itself, which it cannot
        # do once prefix keys are in front: the prefixed path needs transformers' block mask
        mask_of = "sdpa" if inner == PACKED_SDPA else inner
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_of])
    return name


class PrefixHost:
    """The prefix sources of one model, and the hooks that apply them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sources: list[Any] = []
        self.attention = attention_modules(model)
        self.layer_of = {id(m): i for i, m in enumerate(self.attention)}
        self.inner = model.config._attn_implementation or "eager"
        if self.inner not in _SUPPORTED:
            raise ConfigError(
                f"prefix/ptuning2 need attn_implementation sdpa or eager; this model uses {self.inner!r}"
            )
        model.config._attn_implementation = _register(self.inner)
        for module in self.attention:
            setattr(module, _HOST_ATTR, self)
        self._states: list[torch.Tensor] | None = None
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._hook = backbone_of(model).register_forward_pre_hook(self._before_forward, with_kwargs=True)

    @classmethod
    def of(cls, model: nn.Module) -> PrefixHost:
        """The model's host, installed on first use."""
        host = getattr(model, _HOST_ATTR, None)
        if host is None:
            host = cls(model)
            object.__setattr__(model, _HOST_ATTR, host)  # a plain attribute, not a submodule
        return host

    def add(self, source: Any) -> None:
        self.sources.append(source)

    def remove(self, source: Any) -> None:
        """Drop `source`; with none left, the model gets its own attention implementation back."""
        self.sources.remove(source)
        if self.sources:
            return
        self._hook.remove()
        self.model.config._attn_implementation = self.inner
        for module in self.attention:
            delattr(module, _HOST_ATTR)
        object.__delattr__(self.model, _HOST_ATTR)

    def active(self) -> list[Any]:
        return [s for s in self.sources if s.enabled]

    def capture(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[layers, 2, kv_heads, n, head_dim]: every layer's keys and values for `input_ids` [n] as
        the base model computes them (positions 0..n-1, prefixes and input prompts off, eval mode)."""
        prompts = getattr(self.model, PROMPT_HOST_ATTR, None)
        enabled = [(s, s.enabled) for s in self.sources + (prompts.sources if prompts else [])]
        training = self.model.training
        self.captured = {}
        try:
            for source, _ in enabled:
                source.enabled = False
            self.model.eval()
            with torch.no_grad():
                backbone_of(self.model)(input_ids=input_ids[None], use_cache=False)
            layers = [self.captured[i] for i in range(len(self.attention))]
        finally:
            self.captured = None
            self.model.train(training)
            for source, state in enabled:
                source.enabled = state
        return torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])

    # ---- per forward ---------------------------------------------------------------------------
    def _visible(self, batch: int, device: torch.device) -> torch.Tensor:
        """[batch, total prefix length] bool: which prefix columns each row attends to."""
        cols = []
        for source in self.active():
            mask = source.row_mask
            rows = torch.ones(batch, dtype=torch.bool, device=device) if mask is None else mask.to(device)
            cols.append(rows[:, None].expand(batch, source.num_virtual_tokens))
        return torch.cat(cols, dim=1) if cols else torch.zeros(batch, 0, dtype=torch.bool, device=device)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Shift the real tokens' positions by the prefix length each row sees; invalidate the
        per-forward prefix states (recomputed once, at the first attention layer)."""
        self._states = None
        if not self.active():
            return None
        kwargs = forward_kwargs(module, args, kwargs)
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch, length = ref.shape[0], ref.shape[1]
        shift = self._visible(batch, ref.device).sum(dim=1, keepdim=True)
        positions = kwargs.get("position_ids")
        if positions is None:
            start = past_length(kwargs.get("past_key_values"))
            positions = torch.arange(start, start + length, device=ref.device).unsqueeze(0)
        kwargs["position_ids"] = positions + shift
        return (), kwargs

    def states(self, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """Each active source's [layers, 2, kv_heads, n, head_dim] prefix, computed once per forward
        (a projection MLP runs once, not once per layer)."""
        if self._states is None:
            self._states = [s.prefix_states().to(device=device, dtype=dtype) for s in self.active()]
        return self._states

    def extend(self, module, query, key, value, mask, kwargs) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """key/value [B, kv_heads, S, D] -> [B, kv_heads, n + S, D]; the mask [B|1, 1, q, S] gets n
        leading columns (visible, except in rows a mixed batch excludes)."""
        if not self.active():
            return key, value, mask
        layer = self.layer_of[id(module)]
        batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        states = self.states(key.dtype, key.device)
        keys = [s[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1) for s in states]
        values = [s[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1) for s in states]
        key = torch.cat([*keys, key], dim=2)
        value = torch.cat([*values, value], dim=2)
        visible = self._visible(batch, key.device)
        causal = kwargs.get("is_causal", getattr(module, "is_causal", True)) and q_len > 1
        if mask is None and not causal and all(s.row_mask is None for s in self.active()):
            return key, value, None  # every column visible: no mask needed
        if mask is None:
            base = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device)
            base = base.tril(kv_len - q_len) if causal else base  # bottom-right aligned, as a cache needs
            base = base[None, None]
            as_float = self.inner == "eager"
        else:
            base, as_float = mask, mask.dtype != torch.bool
        mask_kv = base.shape[-1]
        base = base.expand(batch, base.shape[1], q_len, mask_kv)
        cols = visible[:, None, None, :].expand(batch, base.shape[1], q_len, visible.shape[1])
        if as_float:
            dtype = base.dtype if base.dtype != torch.bool else query.dtype
            if base.dtype == torch.bool:
                base = torch.zeros_like(base, dtype=dtype).masked_fill(~base, torch.finfo(dtype).min)
            cols = torch.zeros(cols.shape, dtype=dtype, device=key.device).masked_fill(~cols, torch.finfo(dtype).min)
        return key, value, torch.cat([cols, base], dim=-1)
