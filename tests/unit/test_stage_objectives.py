"""Objectives of the pt/mlm/classify/tokens stages against hand-computed values on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.data.text import MlmCollator, TextRow, example_seed
from deltatune.data.tokenize import IGNORE
from deltatune.objectives.classify import balanced_class_weights, weighted_cross_entropy_sum
from deltatune.objectives.mlm import mask_tokens, masked_lm_loss_sum


def test_mask_tokens_follows_bert_proportions():
    n, vocab, mask_id = 200_000, 30_000, 103
    ids = torch.randint(1000, vocab, (n,), generator=torch.Generator().manual_seed(1))
    special = torch.zeros(n, dtype=torch.bool)
    special[::10] = True  # 10% special tokens: never chosen
    inputs, labels = mask_tokens(ids, special, mask_id, vocab, torch.Generator().manual_seed(2))
    chosen = labels != IGNORE
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])  # targets are the original tokens
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    eligible = int((~special).sum())
    k = int(chosen.sum())
    # binomial standard deviations: 15% of 180k -> sd 0.08%; the 80/10/10 split of 27k -> sd <= 0.25%
    assert abs(k / eligible - 0.15) < 0.004
    masked = (inputs[chosen] == mask_id).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    random_share = 1 - masked - kept
    assert abs(masked - 0.8) < 0.012 and abs(kept - 0.1) < 0.01 and abs(random_share - 0.1) < 0.01


def test_mask_tokens_respects_fractions_and_is_seeded():
    ids = torch.arange(1000, 1100)
    special = torch.zeros(100, dtype=torch.bool)
    inputs, labels = mask_tokens(ids, special, 5, 2000, torch.Generator().manual_seed(0), 1.0, 1.0, 0.0)
    assert torch.equal(labels, ids) and (inputs == 5).all()  # everything chosen and masked
    a = mask_tokens(ids, special, 5, 2000, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, special, 5, 2000, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class _Tok:
    mask_token_id, pad_token_id = 103, 0

    def __len__(self) -> int:
        return 30_000


def test_mlm_collator_masks_per_example_independent_of_batch():
    from deltatune.config import MlmConfig

    collator = MlmCollator(_Tok(), MlmConfig(probability=0.5), seed=3)
    rows = [TextRow([101, *range(2000 + 40 * i, 2040 + 40 * i), 102], [True, *[False] * 40, True], i) for i in range(4)]
    together = collator(rows, epoch=0)
    alone = collator([rows[2]], epoch=0)
    assert torch.equal(together["input_ids"][2, :42], alone["input_ids"][0, :42])
    assert torch.equal(together["labels"][2, :42], alone["labels"][0, :42])
    other_epoch = collator([rows[2]], epoch=1)
    assert not torch.equal(other_epoch["labels"], alone["labels"])  # a new mask every epoch
    assert example_seed(3, 0, 2) != example_seed(3, 1, 2) != example_seed(4, 0, 2)
    assert (together["labels"][:, 0] == IGNORE).all() and (together["labels"][:, 41] == IGNORE).all()


def test_masked_lm_loss_is_cross_entropy_at_chosen_positions():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[0, IGNORE, 1]])
    expected = -math.log(math.e**2 / (math.e**2 + 2)) - math.log(1 / (2 + math.e**3))
    assert masked_lm_loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_sum_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    labels = torch.tensor([0, 0, IGNORE])
    ce0 = -math.log(math.e / (math.e + 1))
    ce1 = -math.log(1 / (1 + math.e**2))
    assert weighted_cross_entropy_sum(logits, labels).item() == pytest.approx(ce0 + ce1, rel=1e-6)
    weights = torch.tensor([3.0, 0.5])
    assert weighted_cross_entropy_sum(logits, labels, weights).item() == pytest.approx(3 * ce0 + 3 * ce1, rel=1e-6)
    labels = torch.tensor([0, 1, 1])
    ce2 = -math.log(math.e**2 / (1 + math.e**2))
    expected = 3 * ce0 + 0.5 * ce2 + 0.5 * math.log(2)
    assert weighted_cross_entropy_sum(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_class_weights_average_one_over_training_set():
    counts = [6, 3, 1, 0]
    weights = balanced_class_weights(counts)
    assert weights == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0])
    assert sum(w * c for w, c in zip(weights, counts, strict=True)) / sum(counts) == pytest.approx(1.0)


def test_mlm_loss_head_path_equals_full_logits(tiny_bert):
    from deltatune.models import load_model
    from deltatune.objectives.mlm import mlm_loss

    model, _ = load_model("tiny-bert", task="masked-lm")
    model.eval()
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3], labels[1, 7], labels[1, 8] = 17, 4000, 2500
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss, count = mlm_loss(model, batch)
    full = masked_lm_loss_sum(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, labels)
    assert count == 3
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_class_weights_from_config():
    from deltatune.config import ClassifyConfig
    from deltatune.data.labels import LabelSet
    from deltatune.errors import ConfigError
    from deltatune.recipes.classify import class_weights

    labels = LabelSet(("neg", "neu", "pos"))
    train = [0, 0, 0, 1, 1, 2]
    assert class_weights(ClassifyConfig(), labels, train) is None
    assert class_weights(ClassifyConfig(class_weights="balanced"), labels, train).tolist() == pytest.approx([2 / 3, 1, 2])
    assert class_weights(ClassifyConfig(class_weights={"pos": 3.0}), labels, train).tolist() == [1.0, 1.0, 3.0]
    assert class_weights(ClassifyConfig(class_weights=[1, 2, 3]), labels, train).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match=r"unknown label\(s\) \['posi'\]"):
        class_weights(ClassifyConfig(class_weights={"posi": 3.0}), labels, train)
    with pytest.raises(ConfigError, match="has 2 weights for 3 labels"):
        class_weights(ClassifyConfig(class_weights=[1, 2]), labels, train)
