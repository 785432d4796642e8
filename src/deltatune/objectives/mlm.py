"""Masked language modelling (Devlin et al. 2019, "BERT", sec. 3.1 and appendix A.1).

A fraction p (15%) of the non-special tokens of a sequence is chosen as targets. Of those, 80% are
replaced by [MASK], 10% by a random token and 10% kept, so the model cannot tell from the input
which positions it will be scored on. The loss is the cross-entropy of the original token at the
chosen positions only:

    L = - sum_{t in chosen} log p(x_t | x~)        (x~: the corrupted sequence)

returned as a sum with the number of chosen positions, for per-token normalisation over the whole
optimizer step (see objectives/clm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.data.tokenize import IGNORE

__all__ = ["mask_tokens", "masked_lm_loss_sum", "mlm_loss", "count_masked"]


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt one sequence for MLM.

    Args:
        input_ids: [T] token ids.
        special: [T] bool, True on special tokens ([CLS], [SEP], padding): never chosen.
        generator: the source of randomness (seeded per example by the caller).
        probability: chance that a non-special token is chosen (independently per token).
        mask_fraction / random_fraction: of the chosen tokens, the share replaced by `mask_id` /
            by a token drawn uniformly from [0, vocab_size); the rest are kept.
    Returns:
        (inputs [T], labels [T]): the corrupted ids, and the original id at chosen positions with
        IGNORE elsewhere.
    """
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    to_mask = chosen & (action < mask_fraction)
    to_random = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return inputs, labels


def masked_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy at the chosen positions (no shift: position t predicts token t).

    Args:
        logits: [..., V] scores (any float dtype; computed in fp32).
        labels: [...] original ids at chosen positions, IGNORE elsewhere.
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def count_masked(labels: torch.Tensor) -> int:
    """Positions scored by the MLM loss."""
    return int((labels != IGNORE).sum())


def _prediction_head(model: nn.Module) -> nn.Module | None:
    """The model's MLM head (`cls` for BERT, `lm_head` for RoBERTa) when it is one child module
    holding the output embeddings and the rest of the model is `base_model`; else None."""
    output = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if output is None or base is None or base is model:
        return None
    owners = [child for child in model.children() if child is not base and any(m is output for m in child.modules())]
    others = [child for child in model.children() if child is not base and child not in owners]
    return owners[0] if len(owners) == 1 and not any(p.numel() for c in others for p in c.parameters()) else None


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed MLM loss of a collated batch (input_ids, attention_mask, labels) and its target count.

    The vocabulary projection ([H, V], 30k columns for BERT: about half the compute of MiniLM) runs
    only at the ~15% chosen positions when the model's head can be called on its own.
    """
    labels = batch["labels"]
    keep = labels != IGNORE
    head = _prediction_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if head is None:
        return masked_lm_loss_sum(model(**inputs).logits, labels), int(keep.sum())
    hidden = model.base_model(**inputs).last_hidden_state  # [B, T, H]
    return masked_lm_loss_sum(head(hidden[keep]), labels[keep]), int(keep.sum())
