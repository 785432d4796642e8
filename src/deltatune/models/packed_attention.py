"""Attention over packed rows, one document at a time (variable-length attention for SDPA).

A packed row holds several documents; each must attend only to itself (data/collate.py). Given
restarting `position_ids`, transformers builds a block-diagonal causal mask [B, 1, T, T] for
SDPA, which then computes every query against every key of the row and masks most of them away:
for rows of T tokens holding documents of lengths L_i, it pays T^2 per row where sum(L_i^2) is
the work (~5x more for 512-token rows of ~140-token chats), and the masked kernel is the slower one.

Here each document's slice of the row goes through SDPA on its own with `is_causal=True` (the
fused kernel, no mask tensor): the same result (tests/unit/test_packed_attention.py checks
outputs and gradients against the masked computation), at sum(L_i^2) cost. It is what
FlashAttention's varlen kernel does on GPUs, without needing it.

`use_packed_attention(model)` switches a causal LM from `sdpa` to this implementation; every
call that is not a packed, cache-free forward (generation, padded batches with an attention
mask, prefix tokens in front of the keys) goes to transformers' SDPA path unchanged.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

__all__ = ["PACKED_SDPA", "document_spans", "splits_documents", "use_packed_attention"]

PACKED_SDPA = "deltatune_packed_sdpa"

Spans = list[list[tuple[int, int]]]
# All layers of one forward pass get the same position_ids tensor: find its documents once.
_cache: tuple[weakref.ref | None, Spans | None] = (None, None)


def document_spans(position_ids: torch.Tensor) -> Spans | None:
    """[(start, end), ...] per row: a document starts at every position id 0. None when no row
    holds more than one document (then there is nothing to split).

    Args:
        position_ids: [B, T] (or [1, T] shared by all rows), restarting at 0 for each document.
    """
    global _cache
    ref, spans = _cache
    if ref is not None and ref() is position_ids:
        return spans
    starts = (position_ids == 0).cpu()
    starts[:, 0] = True
    spans = []
    for row in starts:
        begin = row.nonzero().flatten().tolist()
        spans.append(list(zip(begin, [*begin[1:], row.numel()], strict=True)))
    if all(len(row) == 1 for row in spans):
        spans = None
    _cache = (weakref.ref(position_ids), spans)
    return spans


def _packed_sdpa(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The registered attention function (transformers' interface: q [B, H, T, d], k/v [B, Hkv,
    S, d] -> ([B, T, H, d], None))."""
    position_ids = kwargs.get("position_ids")
    same_length = query.shape[2] == key.shape[2]
    spans = document_spans(position_ids) if attention_mask is None and position_ids is not None and same_length else None
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if len(spans) == 1 and query.shape[0] > 1:
        spans = spans * query.shape[0]  # one [1, T] position row shared by the whole batch
    rows = []
    for b, row in enumerate(spans):
        pieces = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                dropout_p=dropout, scale=scaling, is_causal=True,
            )
            for s, e in row
        ]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _packed_sdpa_mask(**kwargs):
    """No mask for a cache-free forward without a padding mask (the attention function splits
    packed rows itself, or SDPA applies `is_causal`); transformers' SDPA mask otherwise."""
    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"] and not kwargs.get("q_offset"):
        return None
    return sdpa_mask(**kwargs)


def _plain_causal(config) -> bool:
    """Whether every layer attends causally to all earlier tokens (no sliding window or chunked
    attention, whose masks this implementation would not apply)."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return getattr(config, "sliding_window", None) is None and all(t == "full_attention" for t in layer_types)


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a causal LM (decoder-only, causal attention) that uses `sdpa` to document-wise attention for packed rows; True if
    switched. Models with sliding-window attention or another implementation are left alone."""
    config = model.config
    if config._attn_implementation != "sdpa" or not _plain_causal(config):
        return False
    if PACKED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(PACKED_SDPA, _packed_sdpa)
        AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    config._attn_implementation = PACKED_SDPA
    return True


def splits_documents(model: nn.Module) -> bool:
    """Whether `model` attends document by document in packed rows, so that a micro-batch of
    packed rows can go in as one padding-free row (data/collate.py `one_row`)."""
    return getattr(model.config, "_attn_implementation", None) == PACKED_SDPA
