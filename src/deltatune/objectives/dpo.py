"""Direct preference optimisation (Rafailov et al. 2023, arXiv:2305.18290) and two variants.

With pi the policy, pi_ref the reference (the same model with the delta disabled), and the
sequence log-probabilities of the preferred (c) and rejected (r) completions,

    h = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]

the losses per pair are

- `sigmoid` (DPO, eq. 7):  -log sigmoid(beta h)  (with label smoothing eps, the conservative DPO
  of Mitchell 2023: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h));
- `ipo` (Azar et al. 2023, arXiv:2310.12036, eq. 17): (h - 1 / (2 beta))^2, which regresses the
  margin to a fixed target instead of pushing it to infinity (here with summed log-probs as in
  the paper; TRL averages them over tokens);
- `hinge` (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - beta h).

The implicit rewards beta [log pi(y|x) - log pi_ref(y|x)] of both completions are returned too:
their difference is the reward margin, and the fraction of pairs where the chosen one is higher is
the preference accuracy (TRL's rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSSES", "DPOOutput", "dpo_loss"]

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


class DPOOutput(NamedTuple):
    losses: torch.Tensor
    """[B] loss per pair."""
    chosen_rewards: torch.Tensor
    """[B] beta * (log pi - log pi_ref) of the chosen completions (detached)."""
    rejected_rewards: torch.Tensor
    """[B] the same for the rejected completions (detached)."""


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Per-pair DPO-family loss (see module docstring).

    Args:
        policy_chosen, policy_rejected: [B] summed completion log-probs under the policy.
        ref_chosen, ref_rejected: [B] the same under the reference model.
        beta: strength of the implicit KL constraint (higher: stay closer to the reference).
        loss: `sigmoid`, `ipo` or `hinge`.
        label_smoothing: assumed fraction of flipped labels (`sigmoid` only).
    Returns:
        DPOOutput(losses [B], chosen_rewards [B], rejected_rewards [B]), all fp32.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; one of {', '.join(DPO_LOSSES)}")
    return DPOOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
