"""Group relative policy optimisation (GRPO; Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

For each prompt q the policy samples a group of G completions o_1..o_G, scored r_1..r_G. There
is no value model: every token of o_i gets the group-normalised advantage (eq. 3's outcome
supervision)

    A_i = (r_i - mean(r)) / std(r)

and the objective (eq. 3) is the clipped surrogate of PPO minus a KL penalty to the reference,
averaged over the tokens of each completion and then over the group:

    J = 1/G sum_i 1/|o_i| sum_t [ min(ratio A_i, clip(ratio, 1-eps, 1+eps) A_i) - beta KL_t ]

with the unbiased, always non-negative KL estimator of Schulman (2020, "k3", eq. 4)

    KL_t = pi_ref/pi - log(pi_ref/pi) - 1.

`scale: false` keeps A_i = r_i - mean(r) (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783, which
argues the std division over-weights groups whose rewards barely differ), and `loss_type: token`
averages over all completion tokens of the batch instead of per sequence (DAPO, Yu et al. 2025).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from deltatune.objectives.logprobs import masked_mean

__all__ = ["GRPOLoss", "group_advantages", "k3_kl", "grpo_loss"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards: [N * G] rewards, the G completions of each prompt next to each other.
        group_size: G.
        scale: divide by the group's (unbiased) standard deviation (+ eps).
    Returns:
        [N * G] advantages; 0 for every member of a group whose rewards are all equal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: exp(d) - d - 1, d = log pi_ref - log pi.
    Shapes: [B, R] -> [B, R]; always >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


class GRPOLoss(NamedTuple):
    loss: torch.Tensor
    """Scalar loss to minimise (-J)."""
    kl: torch.Tensor
    """Scalar: mean per-token k3 KL to the reference (detached)."""
    clip_fraction: torch.Tensor
    """Scalar: fraction of tokens where the clipped term was used (detached)."""


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
    loss_type: Literal["sequence", "token"] = "sequence",
) -> GRPOLoss:
    """The GRPO loss (see module docstring).

    Args:
        logprobs: [B, R] log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: [B, R] at rollout time (equal to `logprobs.detach()` on the first update).
        ref_logprobs: [B, R] under the reference model.
        advantages: [B] one advantage per completion (`group_advantages`).
        mask: [B, R] 1 on completion tokens.
        clip: epsilon of the ratio clip; beta: KL weight (0: no reference needed).
        loss_type: `sequence` (mean over each completion, then over completions, as the paper)
            or `token` (mean over all completion tokens of the batch).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.float().unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = k3_kl(logprobs, ref_logprobs)
    if beta:
        per_token = per_token + beta * kl
    if loss_type == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; use sequence or token")
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return GRPOLoss(loss, masked_mean(kl.detach(), mask), clip_fraction.detach())
