"""Streaming scores: entity-level P/R/F1 (seqeval-style) and accuracy / macro-F1, by hand and against oracles."""

from __future__ import annotations

import random

import pytest
import torch

from deltatune.eval.metrics import majority_baseline
from deltatune.eval.scores import ConfusionMatrix, EntityCounts, get_entities


def test_get_entities_bio_by_hand():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-ORG", "I-ORG", "O", "I-MISC", "B-geo-loc", "B-geo-loc"]
    assert get_entities(tags) == [
        ("PER", 0, 1),
        ("LOC", 3, 3),
        ("ORG", 4, 5),  # I- of another type starts a new entity (conlleval)
        ("MISC", 7, 7),  # I- after O starts one too
        ("geo-loc", 8, 8),
        ("geo-loc", 9, 9),
    ]
    assert get_entities(["O", "O"]) == []


def test_entity_scores_by_hand():
    counts = EntityCounts()
    counts.update(["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-ORG"])  # 1 tp, LOC missed, ORG wrong
    counts.update(["B-LOC", "I-LOC", "O"], ["B-LOC", "O", "O"])  # boundary error: no credit
    scores = counts.scores()
    # gold: PER, LOC, LOC(2 words) = 3; predicted: PER, ORG, LOC(1 word) = 3; correct: PER = 1
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    assert scores["f1_per_type"] == {"LOC": 0.0, "ORG": 0.0, "PER": 1.0}
    assert scores["entities"] == 3


def _random_tags(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-geo-loc", "I-geo-loc"]) for _ in range(n)]


def test_entity_scores_match_seqeval():
    metrics = pytest.importorskip("seqeval.metrics")
    rng = random.Random(0)
    gold = [_random_tags(rng, rng.randint(1, 15)) for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-LOC", "B-geo-loc"]) for t in g] for g in gold]
    counts = EntityCounts()
    for g, p in zip(gold, pred, strict=True):
        counts.update(g, p)
    scores = counts.scores()
    assert scores["precision"] == pytest.approx(metrics.precision_score(gold, pred))
    assert scores["recall"] == pytest.approx(metrics.recall_score(gold, pred))
    assert scores["f1"] == pytest.approx(metrics.f1_score(gold, pred))


def test_confusion_matrix_accuracy_and_macro_f1_by_hand():
    matrix = ConfusionMatrix(4)
    gold = torch.tensor([0, 0, 1, 1, 2, 2, -100])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 3])
    # streamed in two pieces: the same counts as at once
    matrix.update(pred[:3], gold[:3])
    matrix.update(pred[3:], gold[3:])
    assert matrix.total == 6  # the IGNORE position is skipped
    assert matrix.accuracy() == pytest.approx(4 / 6)
    # class 0: p 1/2 r 1/2; class 1: p 2/3 r 1; class 2: p 1 r 1/2; class 3 absent (not averaged)
    f1 = [0.5, 0.8, 2 / 3, 0.0]
    assert matrix.f1_per_class() == pytest.approx(f1)
    assert matrix.macro_f1() == pytest.approx(sum(f1[:3]) / 3)


def test_macro_f1_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    gold, pred = torch.randint(0, 5, (500,), generator=g), torch.randint(0, 4, (500,), generator=g)
    matrix = ConfusionMatrix(5)
    matrix.update(pred, gold)
    assert matrix.macro_f1() == pytest.approx(sk.f1_score(gold.numpy(), pred.numpy(), average="macro"))
    assert matrix.accuracy() == pytest.approx(sk.accuracy_score(gold.numpy(), pred.numpy()))


def test_majority_baseline():
    baseline = majority_baseline([0, 1, 1, 2], [1, 1, 0, 2, 2], ["a", "b", "c"])
    # always 'b': accuracy 2/5; F1(b) = 2 * (2/5 * 1) / (2/5 + 1) = 4/7, a and c 0 -> macro over 3 classes
    assert baseline == {"label": "b", "accuracy": pytest.approx(0.4), "macro_f1": pytest.approx(4 / 21)}
