"""Held-out metrics of the preference stages, streamed batch by batch (nothing kept but sums).

Both have the signature of the per-stage metric functions, (model, batches, **context) -> dict.

- `reward`: Bradley–Terry loss, pairwise accuracy (the chosen completion scores higher), mean
  margin r_chosen - r_rejected, mean chosen and rejected rewards.
- `dpo`: DPO loss, preference accuracy of the implicit rewards beta log(pi / pi_ref) (TRL's
  rewards/accuracies; 0.5 for the reference itself, where every implicit reward is 0), reward
  margin, chosen and rejected rewards, and `logp_accuracy`: how often the model itself gives the
  chosen completion the higher log-probability (meaningful for the base model too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from deltatune.deltas import DeltaSet
from deltatune.objectives.dpo import dpo_loss
from deltatune.objectives.reward import bradley_terry_loss, pairwise_accuracy
from deltatune.rlhf.scoring import reward_scores, sequence_logps

__all__ = ["reward_metrics", "dpo_metrics", "pair_logps"]


class _Sums:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, count: int, **values: torch.Tensor) -> None:
        self.count += count
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.sum())

    def means(self) -> dict[str, float]:
        return {key: value / max(self.count, 1) for key, value in self.sums.items()}


def _device_batches(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]):
    device = next(model.parameters()).device
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def reward_metrics(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], autocast: Callable = nullcontext, **_: Any
) -> dict[str, float]:
    """Reward-model metrics over pair batches (`collate_pairs`)."""
    was_training = model.training
    model.eval()
    sums = _Sums()
    for batch in _device_batches(model, batches):
        with autocast():
            chosen, rejected = reward_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
        sums.add(
            len(chosen),
            loss=bradley_terry_loss(chosen, rejected, batch.get("margin")),
            accuracy=pairwise_accuracy(chosen, rejected),
            margin=chosen - rejected,
            chosen=chosen,
            rejected=rejected,
        )
    model.train(was_training)
    return sums.means()


def pair_logps(
    model: nn.Module, deltas: DeltaSet, batch: dict[str, torch.Tensor], reference: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed completion
    log-probs, each [B]. The reference is the model with its deltas disabled, or looked up in
    `reference` ([N, 2] precomputed (chosen, rejected) log-probs) by the batch's `index`."""
    policy_chosen, policy_rejected = sequence_logps(model, batch).chunk(2)
    if reference is not None:
        ref = reference.to(policy_chosen.device)[batch["index"]]
        return policy_chosen, policy_rejected, ref[:, 0], ref[:, 1]
    with torch.no_grad(), deltas.disabled():
        ref_chosen, ref_rejected = sequence_logps(model, batch).chunk(2)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


@torch.no_grad()
def dpo_metrics(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    deltas: DeltaSet,
    beta: float,
    loss: str = "sigmoid",
    reference: torch.Tensor | None = None,
    autocast: Callable = nullcontext,
    **_: Any,
) -> dict[str, float]:
    """DPO metrics over pair batches (see module docstring); `deltas` give the reference (disabled),
    or `reference` holds precomputed reference log-probs ([N, 2], by pair index)."""
    was_training = model.training
    model.eval()
    sums = _Sums()
    for batch in _device_batches(model, batches):
        with autocast():
            pc, pr, rc, rr = pair_logps(model, deltas, batch, reference)
        out = dpo_loss(pc, pr, rc, rr, beta, loss)  # type: ignore[arg-type]
        sums.add(
            len(pc),
            loss=out.losses,
            accuracy=pairwise_accuracy(out.chosen_rewards, out.rejected_rewards),
            margin=out.chosen_rewards - out.rejected_rewards,
            chosen=out.chosen_rewards,
            rejected=out.rejected_rewards,
            logp_accuracy=pairwise_accuracy(pc, pr),
        )
    model.train(was_training)
    return sums.means()
