"""Reward-model objective: the pairwise Bradley–Terry loss.

A reward model r(x, y) gives one scalar per (prompt, completion). Given a preferred completion
y_c and a rejected one y_r for the same prompt, Bradley & Terry (1952) model the preference as
P(y_c > y_r) = sigmoid(r(x, y_c) - r(x, y_r)); the loss is its negative log-likelihood
(Ouyang et al. 2022, InstructGPT, eq. 1):

    loss = -log sigmoid(r_c - r_r - margin)

`margin` (optional, per pair) asks for a larger gap where annotators were more certain (Llama 2,
Touvron et al. 2023, eq. 2). `center_coef` adds coef * (r_c + r_r)^2, which keeps rewards near
zero-mean without changing the preferences (Eisenstein et al. 2023), so a reward model feeds PPO
rewards on a stable scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "pairwise_accuracy", "last_token_scores"]


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss (see module docstring).

    Args:
        chosen: [B] rewards of the preferred completions.
        rejected: [B] rewards of the rejected completions.
        margin: [B] optional required gap per pair.
        center_coef: weight of the (r_c + r_r)^2 centring term.
    Returns:
        [B] fp32 losses (sum or average them as the loop needs).
    """
    chosen, rejected = chosen.float(), rejected.float()
    gap = chosen - rejected
    if margin is not None:
        gap = gap - margin.float()
    losses = -F.logsigmoid(gap)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[B] 1.0 where the chosen completion scores higher, 0.0 where lower, 0.5 on a tie (so a model
    that cannot tell the two apart scores chance, 0.5, not 0)."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score at each row's last real token: a decoder's summary of the whole sequence.

    Args:
        scores: [B, T] per-position scalar outputs (a reward or value head on every hidden state).
        attention_mask: [B, T] 1 on real tokens, 0 on padding (left or right).
    Returns:
        [B] scores at the last position whose mask is 1.
    """
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (positions * attention_mask.long()).argmax(dim=1)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)
