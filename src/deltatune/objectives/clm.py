"""Causal language-model loss (continued pretraining, SFT): next-token cross-entropy.

Returned as a *sum* over label tokens together with the count, so the training loop can divide by
the number of label tokens of the whole optimizer step (all micro-batches, all ranks). Dividing each
micro-batch by its own count instead weights short-reply batches up: the classic gradient
accumulation bug.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.data.tokenize import IGNORE
from deltatune.objectives.linear_ce import linear_cross_entropy_sum

__all__ = ["count_label_tokens", "causal_lm_loss_sum", "lm_loss", "model_inputs"]


def count_label_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (labels [B, T]; the first column never does)."""
    return int((labels[:, 1:] != IGNORE).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(labels[:, t+1] | tokens <= t) over label positions.

    Args:
        logits: [B, T, V] (any float dtype; the loss is computed in fp32).
        labels: [B, T] token ids, IGNORE where there is no target.
    Returns:
        A scalar fp32 tensor: the summed cross-entropy (divide by `count_label_tokens`).
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE, reduction="sum")


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that the model takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _hidden_path_ok(model: torch.nn.Module) -> bool:
    """Whether logits are exactly lm_head(last hidden state) for this model (no softcap/scale)."""
    config = model.config
    return (
        type(model).__name__.endswith("ForCausalLM")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
        and model.get_output_embeddings() is not None
    )


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a causal LM on a collated batch, and its label-token count.

    Logits are computed only at positions that have a target: the LM head ([H, V], 49k columns
    for SmolLM2) is the largest matmul of a small model, and in SFT most positions are prompt.
    """
    labels = batch["labels"]
    count = count_label_tokens(labels)
    if not _hidden_path_ok(model):
        logits = model(**model_inputs(batch), use_cache=False).logits
        return causal_lm_loss_sum(logits, labels), count
    hidden = model.base_model(**model_inputs(batch), use_cache=False).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    head = model.get_output_embeddings()
    if plain_head(head):  # chunked through the head: the [N, V] logits never exist at once
        return linear_cross_entropy_sum(hidden[:, :-1][keep], head.weight, targets[keep]), count
    logits = head(hidden[:, :-1][keep])  # [N, V]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), count


def plain_head(head: torch.nn.Module | None) -> bool:
    """An unwrapped bias-free Linear whose weight is not sharded: the head `lm_loss` runs chunked
    (not a delta-wrapped head; not an FSDP-sharded weight, which only the module's forward gathers)."""
    from torch.distributed.tensor import DTensor

    return type(head) is torch.nn.Linear and head.bias is None and not isinstance(head.weight.data, DTensor)
