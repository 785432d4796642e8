"""Classification losses: a class per sequence (`classify`) or per token (`tokens`, e.g. NER).

Both are (optionally class-weighted) cross-entropy, returned as a sum with its unit count (examples
or labelled tokens) so the training loop normalises over the whole optimizer step. With class
weights w the sum is  sum_i w[y_i] * CE(z_i, y_i)  and the count is the number of units, as Keras'
`class_weight` (PyTorch's weighted mean divides by sum_i w[y_i] instead). With `balanced` weights,
w[c] = n / (K * n_c) over the K classes present, the mean weight over the training set is exactly 1, so the loss keeps its scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.data.tokenize import IGNORE

__all__ = [
    "weighted_cross_entropy_sum",
    "balanced_class_weights",
    "sequence_classification_loss",
    "token_classification_loss",
    "count_labelled",
]


def weighted_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_i w[y_i] * -log softmax(logits_i)[y_i] over the positions with a label.

    Args:
        logits: [N, K] (or [..., K]) class scores, any float dtype (computed in fp32).
        labels: [N] (or [...]) class ids, IGNORE where there is none.
        weights: [K] per-class weights, or None for all 1.
    Returns:
        A scalar fp32 tensor.
    """
    logits = logits.reshape(-1, logits.size(-1)).float()
    labels = labels.reshape(-1)
    if weights is not None:
        weights = weights.to(logits.device, torch.float32)
    return F.cross_entropy(logits, labels, weight=weights, ignore_index=IGNORE, reduction="sum")


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """scikit-learn's `balanced` weights n / (K * n_c) from per-class counts, K counting the classes
    present (an absent class gets weight 0), so the mean weight over the examples is 1."""
    total, k = sum(counts), sum(1 for c in counts if c)
    return [total / (k * c) if c else 0.0 for c in counts]


def count_labelled(labels: torch.Tensor) -> int:
    """Units a classification batch contributes: examples ([B] labels) or labelled tokens ([B, T])."""
    return int((labels != IGNORE).sum())


_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def sequence_classification_loss(
    weights: torch.Tensor | None = None,
) -> Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]:
    """LossFn for a `*ForSequenceClassification` model on batches with labels [B]."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(**{k: batch[k] for k in _INPUTS if k in batch}).logits  # [B, K]
        return weighted_cross_entropy_sum(logits, batch["labels"], weights), count_labelled(batch["labels"])

    return loss


def token_classification_loss(
    weights: torch.Tensor | None = None,
) -> Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]:
    """LossFn for a `*ForTokenClassification` model on batches with labels [B, T] (IGNORE off
    first sub-words and on padding)."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(**{k: batch[k] for k in _INPUTS if k in batch}).logits  # [B, T, K]
        return weighted_cross_entropy_sum(logits, batch["labels"], weights), count_labelled(batch["labels"])

    return loss
