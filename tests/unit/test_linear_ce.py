"""Chunked cross-entropy through the LM head (objectives/linear_ce.py) against the plain
logits -> F.cross_entropy computation: loss and gradients, in several chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.objectives import linear_ce
from deltatune.objectives.clm import causal_lm_loss_sum, lm_loss


def test_loss_and_gradients_equal_the_plain_computation(monkeypatch):
    monkeypatch.setattr(linear_ce, "CHUNK_LOGITS", 50 * 16)  # chunks of 16 rows: 37 = 16 + 16 + 5
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    ours = linear_ce.linear_cross_entropy_sum(hidden, weight, targets)
    (ours * 0.37).backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (plain * 0.37).backward()
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(ours_grads[0], hidden.grad)
    torch.testing.assert_close(ours_grads[1], weight.grad)
    with torch.no_grad():  # evaluation: the same value, no gradients computed
        torch.testing.assert_close(linear_ce.linear_cross_entropy_sum(hidden, weight, targets), plain)


def test_lm_loss_equals_the_full_logits_loss_with_lora_gradients(tiny_llama):
    from deltatune.deltas import LoraConfig, attach

    model, tok = tiny_llama
    deltas = attach(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    grads = []
    for loss_fn in (lambda: lm_loss(model, batch)[0],
                    lambda: causal_lm_loss_sum(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, labels)):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in deltas.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-4)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][name], rtol=1e-4, atol=1e-5, msg=name)
