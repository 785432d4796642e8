"""Virtual tokens in the input: the machinery of `prompt` and `ptuning`.

`PromptHost` puts forward hooks on a model's backbone (`model.base_model`: `LlamaModel`,
`BertModel`, ...), so one mechanism serves every architecture and every head on top:

- before the backbone runs, `input_ids` become `inputs_embeds` with the virtual tokens in front
  (k columns; `attention_mask`, `position_ids` and `token_type_ids` grow to match: the virtual
  tokens take positions 0..k-1 and the real tokens k, k+1, ..., as in PEFT);
- after it runs, the virtual positions are removed from `last_hidden_state` (and `hidden_states`,
  `attentions`), so whatever consumes the backbone's output (the LM head and the loss, a token
  classifier, the last-non-pad-token pooling of a decoder classifier, which reads `input_ids`) sees
  the original shape. An encoder's pooler is re-run on the first *real* token ([CLS]), not on the
  first virtual one.

Packed rows (`position_ids` restarting per document, no attention mask) get the virtual tokens in
front of *every* document, so a packed row computes exactly what its documents would alone.
In generation the prompt is inserted at prefill; once the KV cache holds it, later steps only
widen the attention mask and shift the positions.

A source is any object with `enabled: bool`, `row_mask: Tensor | None` ([batch] bool, for mixed
batches), `num_virtual_tokens: int` and `prompt_embeddings() -> Tensor` [num_virtual_tokens, hidden].
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from torch import nn

__all__ = ["PromptHost", "backbone_of", "forward_kwargs", "past_length", "document_starts"]

HOST_ATTR = "_deltatune_prompt_host"


def backbone_of(model: nn.Module) -> nn.Module:
    """The module that turns token ids into hidden states (`model.base_model` for transformers)."""
    return getattr(model, "base_model", model)


@cache
def _parameter_names(cls: type) -> tuple[str, ...]:
    params = inspect.signature(cls.forward).parameters.values()
    return tuple(p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def forward_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All arguments of a forward call as keywords (positional ones named from the signature)."""
    return {**dict(zip(_parameter_names(type(module)), args, strict=False)), **kwargs}


def past_length(cache: Any) -> int:
    """Tokens already in a KV cache (0 without one)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: where a document starts in a packed row (position ids not increasing by one;
    the rule transformers uses to build a packed row's block-diagonal mask)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return starts


class _Layout:
    """Where k virtual slots go in front of each sequence start (starts [B, T] bool).

    `index` [B, T]: the new column of each real token; `rows`, `slots` [docs, k]: the row and the
    columns of each start's virtual slots; `length`: the new row length.
    """

    def __init__(self, starts: torch.Tensor, k: int) -> None:
        self.index = torch.arange(starts.shape[1], device=starts.device) + k * starts.long().cumsum(dim=1)
        self.length = starts.shape[1] + k * int(starts.sum(dim=1).max())
        self.rows, cols = starts.nonzero(as_tuple=True)
        self.slots = self.index[self.rows, cols][:, None] - k + torch.arange(k, device=starts.device)

    def place(self, real: torch.Tensor, virtual: torch.Tensor | int) -> torch.Tensor:
        """real [B, T, ...] at their new columns, `virtual` ([docs, k, ...] or a scalar) in the slots,
        zeros elsewhere (the tail of rows with fewer documents): [B, length, ...]."""
        out = real.new_zeros((real.shape[0], self.length, *real.shape[2:]))
        index = self.index.view(*self.index.shape, *([1] * (real.dim() - 2))).expand_as(real)
        out = out.scatter(1, index, real)
        return out.index_put((self.rows[:, None].expand_as(self.slots), self.slots), torch.as_tensor(virtual, dtype=out.dtype, device=out.device))


class PromptHost:
    """The virtual-token sources of one model, and the hooks that apply them (see module doc)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.backbone = backbone_of(model)
        self.sources: list[Any] = []
        self._index: torch.Tensor | None = None
        self._hooks = [
            self.backbone.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.backbone.register_forward_hook(self._after_forward),
        ]

    @classmethod
    def of(cls, model: nn.Module) -> PromptHost:
        host = getattr(model, HOST_ATTR, None)
        if host is None:
            host = cls(model)
            object.__setattr__(model, HOST_ATTR, host)  # a plain attribute, not a submodule
        return host

    def add(self, source: Any) -> None:
        self.sources.append(source)

    def remove(self, source: Any) -> None:
        """Drop `source`; with none left, the hooks go too."""
        self.sources.remove(source)
        if not self.sources:
            for hook in self._hooks:
                hook.remove()
            object.__delattr__(self.model, HOST_ATTR)

    def active(self) -> list[Any]:
        return [s for s in self.sources if s.enabled]

    def _visible(self, batch: int, device: torch.device) -> torch.Tensor:
        """[batch, total virtual tokens] bool: which virtual tokens each row sees."""
        cols = []
        for source in self.active():
            rows = torch.ones(batch, dtype=torch.bool, device=device) if source.row_mask is None else source.row_mask.to(device)
            cols.append(rows[:, None].expand(batch, source.num_virtual_tokens))
        return torch.cat(cols, dim=1)

    # ---- hooks ---------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._index = None
        if not self.active():
            return None
        kw = forward_kwargs(module, args, kwargs)
        ids = kw.get("input_ids")
        batch = (ids if ids is not None else kw["inputs_embeds"]).shape[0]
        device = (ids if ids is not None else kw["inputs_embeds"]).device
        visible = self._visible(batch, device)
        if past_length(kw.get("past_key_values")) > 0:
            return (), self._continue(kw, visible)
        return (), self._prepend(kw, visible)

    def _continue(self, kw: dict, visible: torch.Tensor) -> dict:
        """A step after prefill: the cache holds the prompt; widen the mask, shift the positions."""
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = torch.cat([visible.to(kw["attention_mask"].dtype), kw["attention_mask"]], dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + visible.sum(dim=1, keepdim=True)
        return kw

    def _prepend(self, kw: dict, visible: torch.Tensor) -> dict:
        """Insert the prompt in front of each sequence (each document of a packed row)."""
        ids = kw.pop("input_ids", None)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = self.backbone.get_input_embeddings()(ids)
        batch, length = embeds.shape[:2]
        mixed = any(s.row_mask is not None for s in self.active())  # (a host check: no device sync)
        mask, positions = kw.get("attention_mask"), kw.get("position_ids")
        if positions is not None:
            positions = positions.expand(batch, -1)
        packed = mask is None and positions is not None and bool(document_starts(positions)[:, 1:].any())
        if packed and mixed:
            raise ValueError("a mixed-adapter batch cannot hold packed rows; give an attention_mask instead")
        starts = document_starts(positions) if packed else torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)
        starts[:, 0] = True
        layout = _Layout(starts, visible.shape[1])

        prompt = torch.cat([s.prompt_embeddings() for s in self.active()]).to(embeds.dtype)  # [k, H]
        kw["inputs_embeds"] = layout.place(embeds, prompt.expand(len(layout.rows), -1, -1))
        if positions is not None or mixed:
            # Real tokens move up by the virtual tokens the row sees; visible slots count 0, 1, ...
            base = positions if positions is not None else torch.arange(length, device=embeds.device).expand(batch, -1)
            slot_positions = (visible.long().cumsum(dim=1) - 1).clamp(min=0)
            kw["position_ids"] = layout.place(base + visible.sum(dim=1, keepdim=True), slot_positions[layout.rows])
        if mask is not None or mixed:
            real = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=embeds.device)
            kw["attention_mask"] = layout.place(real, visible[layout.rows].to(real.dtype))
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = layout.place(kw["token_type_ids"], 0)
        self._index = layout.index
        return kw

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Remove the virtual positions from the backbone's outputs; re-pool an encoder on [CLS]."""
        index, self._index = self._index, None
        if index is None:
            return None

        def strip(h: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, T, H]
            return h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))

        if isinstance(output, tuple):
            return (strip(output[0]), *output[1:])
        output.last_hidden_state = strip(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(strip(h) for h in output.hidden_states)
        if getattr(output, "attentions", None) is not None:
            output.attentions = tuple(_strip_attention(a, index) for a in output.attentions)
        if getattr(output, "pooler_output", None) is not None and getattr(module, "pooler", None) is not None:
            output.pooler_output = module.pooler(output.last_hidden_state)
        return output


def _strip_attention(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, L] attention weights -> [B, heads, T, T] (real queries and keys only)."""
    b, h, _, length = weights.shape
    rows = weights.gather(2, index[:, None, :, None].expand(b, h, -1, length))
    return rows.gather(3, index[:, None, None, :].expand(b, h, index.shape[1], -1))
