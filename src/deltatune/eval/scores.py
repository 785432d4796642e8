"""Streaming scores: state that grows with the number of classes, never with the data.

- `ConfusionMatrix` (K x K counts) -> accuracy, per-class and macro F1 (classification).
- `get_entities` + `EntityCounts` -> entity-level precision / recall / F1 as `seqeval` and the
  CoNLL-2000 `conlleval` script compute them (an entity counts only when type and span both match).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["ConfusionMatrix", "get_entities", "EntityCounts", "f1_score"]


def f1_score(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class ConfusionMatrix:
    """counts[gold, predicted], accumulated batch by batch."""

    def __init__(self, num_classes: int) -> None:
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, predicted: torch.Tensor, gold: torch.Tensor) -> None:
        """predicted, gold: [N] class ids (entries of gold < 0, e.g. IGNORE, are skipped)."""
        keep = gold >= 0
        k = self.counts.size(0)
        flat = gold[keep].cpu() * k + predicted[keep].cpu()
        self.counts += torch.bincount(flat, minlength=k * k).view(k, k)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def accuracy(self) -> float:
        return float(self.counts.diagonal().sum()) / max(self.total, 1)

    def f1_per_class(self) -> list[float]:
        tp = self.counts.diagonal().double()
        predicted, gold = self.counts.sum(0).double(), self.counts.sum(1).double()
        return [
            f1_score(float(tp[c] / predicted[c]) if predicted[c] else 0.0, float(tp[c] / gold[c]) if gold[c] else 0.0)
            for c in range(self.counts.size(0))
        ]

    def macro_f1(self) -> float:
        """Mean F1 over the classes that occur in the gold labels or the predictions (scikit-learn's
        `f1_score(average="macro")`)."""
        seen = (self.counts.sum(0) + self.counts.sum(1)) > 0
        scores = [f for f, s in zip(self.f1_per_class(), seen.tolist(), strict=True) if s]
        return sum(scores) / len(scores) if scores else 0.0


def _split_tag(tag: str) -> tuple[str, str]:
    """`B-geo-loc` -> (`B`, `geo-loc`); `O` -> (`O`, ``); a bare `PER` -> (`I`, `PER`)."""
    if tag in ("O", "", "-"):
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep:
        return "I", tag
    return prefix, kind


def _chunk_ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != kind


def _chunk_starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("I", "E"):
        return True
    return tag != "O" and prev_type != kind


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of a tag sequence as (type, first, last) word indices (BIO/IOB2, also IOBES and
    IOB1: an `I-` after `O` or after another type starts an entity, as in conlleval)."""
    entities, begin = [], 0
    prev, prev_type = "O", ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = _split_tag(str(tag))
        if _chunk_ends(prev, prefix, prev_type, kind):
            entities.append((prev_type, begin, i - 1))
        if _chunk_starts(prev, prefix, prev_type, kind):
            begin = i
        prev, prev_type = prefix, kind
    return entities


class EntityCounts:
    """True positives, predicted and gold entity counts per type, accumulated sentence by sentence."""

    def __init__(self) -> None:
        self.tp: Counter[str] = Counter()
        self.predicted: Counter[str] = Counter()
        self.gold: Counter[str] = Counter()

    def update(self, gold_tags: Sequence[str], predicted_tags: Sequence[str]) -> None:
        gold, predicted = set(get_entities(gold_tags)), set(get_entities(predicted_tags))
        self.gold.update(kind for kind, _, _ in gold)
        self.predicted.update(kind for kind, _, _ in predicted)
        self.tp.update(kind for kind, _, _ in gold & predicted)

    @staticmethod
    def _prf(tp: int, predicted: int, gold: int) -> tuple[float, float, float]:
        precision = tp / predicted if predicted else 0.0
        recall = tp / gold if gold else 0.0
        return precision, recall, f1_score(precision, recall)

    def scores(self) -> dict[str, Any]:
        """Micro-averaged precision/recall/F1 over all entities, and F1 per type."""
        precision, recall, f1 = self._prf(sum(self.tp.values()), sum(self.predicted.values()), sum(self.gold.values()))
        per_type = {
            kind: round(self._prf(self.tp[kind], self.predicted[kind], self.gold[kind])[2], 6)
            for kind in sorted(set(self.gold) | set(self.predicted))
        }
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "entities": sum(self.gold.values()),
            "f1_per_type": per_type,
        }
