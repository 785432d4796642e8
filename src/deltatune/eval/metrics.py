"""Per-stage metrics over an eval split, streamed batch by batch (no logits are kept).

`METRICS` maps a `stage:` to its metric function, one line each. A metric function takes the
model, an iterable of collated batches and keyword context from the stage's eval setup (label
names, class weights) and returns a flat dict of numbers (plus per-class breakdowns):

    def my_metrics(model, batches, **context) -> dict[str, Any]: ...
    METRICS["reward"] = my_metrics
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from deltatune.data.tokenize import IGNORE
from deltatune.eval.scores import ConfusionMatrix, EntityCounts
from deltatune.objectives.classify import weighted_cross_entropy_sum
from deltatune.objectives.clm import lm_loss
from deltatune.objectives.mlm import mlm_loss

__all__ = ["MetricFn", "METRICS", "lm_metrics", "mlm_metrics", "classify_metrics", "tokens_metrics", "batches_on", "majority_baseline"]

Batch = dict[str, torch.Tensor]
MetricFn = Callable[..., dict[str, Any]]
"""(model, batches, **context) -> metrics."""

_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def batches_on(model: nn.Module, batches: Iterable[Batch]) -> Iterable[Batch]:
    """The batches moved to the model's device, one at a time."""
    device = next(model.parameters()).device
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


def _loss_metrics(model: nn.Module, batches: Iterable[Batch], loss_fn, autocast) -> dict[str, Any]:
    total, count = 0.0, 0
    for batch in batches_on(model, batches):
        with autocast():
            loss_sum, n = loss_fn(model, batch)
        total, count = total + float(loss_sum), count + n
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def lm_metrics(model: nn.Module, batches: Iterable[Batch], autocast=nullcontext, **_: Any) -> dict[str, Any]:
    """Causal-LM loss per label token and perplexity = exp(loss) (stages `pt`, `sft`)."""
    return _loss_metrics(model.eval(), batches, lm_loss, autocast)


@torch.no_grad()
def mlm_metrics(model: nn.Module, batches: Iterable[Batch], autocast=nullcontext, **_: Any) -> dict[str, Any]:
    """Masked-LM loss per masked token and pseudo-perplexity exp(loss), on fixed eval masks."""
    return _loss_metrics(model.eval(), batches, mlm_loss, autocast)


def _logits(model: nn.Module, batch: Batch, autocast) -> torch.Tensor:
    with autocast():
        return model(**{k: batch[k] for k in _INPUTS if k in batch}).logits.float()


@torch.no_grad()
def classify_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    label_names: Sequence[str],
    class_weights: torch.Tensor | None = None,
    autocast=nullcontext,
    **_: Any,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label F1 and the (weighted) loss of a sequence classifier."""
    model.eval()
    matrix = ConfusionMatrix(len(label_names))
    total = 0.0
    for batch in batches_on(model, batches):
        logits = _logits(model, batch, autocast)  # [B, K]
        total += float(weighted_cross_entropy_sum(logits, batch["labels"], class_weights))
        matrix.update(logits.argmax(-1), batch["labels"])
    per_label = matrix.f1_per_class()
    return {
        "loss": total / max(matrix.total, 1),
        "accuracy": matrix.accuracy(),
        "macro_f1": matrix.macro_f1(),
        "f1_per_label": {name: round(f, 6) for name, f in zip(label_names, per_label, strict=True)},
        "examples": matrix.total,
    }


@torch.no_grad()
def tokens_metrics(
    model: nn.Module, batches: Iterable[Batch], label_names: Sequence[str], autocast=nullcontext, **_: Any
) -> dict[str, Any]:
    """Entity-level precision/recall/F1 (seqeval-style), token accuracy and loss of a token tagger.

    Each sentence is scored on its labelled positions (the first sub-word of each word), in order.
    """
    model.eval()
    entities = EntityCounts()
    correct = labelled = 0
    total = 0.0
    for batch in batches_on(model, batches):
        logits = _logits(model, batch, autocast)  # [B, T, K]
        labels = batch["labels"]
        total += float(weighted_cross_entropy_sum(logits, labels))
        predicted = logits.argmax(-1)
        keep = labels != IGNORE
        correct += int((predicted[keep] == labels[keep]).sum())
        labelled += int(keep.sum())
        for row_pred, row_gold, row_keep in zip(predicted.cpu(), labels.cpu(), keep.cpu(), strict=True):
            gold = [label_names[i] for i in row_gold[row_keep].tolist()]
            pred = [label_names[i] for i in row_pred[row_keep].tolist()]
            entities.update(gold, pred)
    return {
        **entities.scores(),
        "token_accuracy": correct / max(labelled, 1),
        "loss": total / max(labelled, 1),
        "words": labelled,
    }


def majority_baseline(train_labels: Sequence[int], eval_labels: Sequence[int], label_names: Sequence[str]) -> dict[str, Any]:
    """Scores of always predicting the most frequent training class on the eval labels."""
    majority = Counter(train_labels).most_common(1)[0][0]
    matrix = ConfusionMatrix(len(label_names))
    gold = torch.tensor(list(eval_labels), dtype=torch.long)
    matrix.update(torch.full_like(gold, majority), gold)
    return {"label": label_names[majority], "accuracy": matrix.accuracy(), "macro_f1": matrix.macro_f1()}


METRICS: dict[str, MetricFn] = {
    "sft": lm_metrics,
    "pt": lm_metrics,
    "mlm": mlm_metrics,
    "classify": classify_metrics,
    "tokens": tokens_metrics,
}
"""Metric function of each stage (`deltatune eval`, and the end-of-training report)."""
