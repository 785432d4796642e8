"""PPO for language models (RLHF): KL-penalised rewards, GAE, clipped policy and value losses.

The policy generates a completion of R tokens for each prompt. Following Ziegler et al. 2019
(arXiv:1909.08593) and Ouyang et al. 2022 (InstructGPT, eq. 2), each completion token t earns

    r_t = -kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))     (+ the reward model's score at the last token)

Advantages come from generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438):

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);   A_t = sum_l (gamma lam)^l delta_{t+l};   returns_t = A_t + V(s_t)

and the update maximises the clipped surrogate of Schulman et al. 2017 (arXiv:1707.06347, eq. 7),
with the value function fitted by a clipped squared error (the PPO2 implementation, as in TRL):

    L_policy = E[max(-A ratio, -A clip(ratio, 1-eps, 1+eps))],   ratio = exp(log pi - log pi_old)
    L_value  = 0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]

All tensors are over completion tokens only: [B, R] with a `mask` of 1 up to and including each
completion's end-of-sequence token, 0 after it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from deltatune.objectives.logprobs import masked_mean

__all__ = [
    "PolicyLoss",
    "kl_penalized_rewards",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "adaptive_kl_coef",
]


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (log pi - log pi_ref), plus the sequence score at the last token.

    Args:
        scores: [B] one reward per completion (reward model or function).
        logprobs, ref_logprobs: [B, R] log-probs of the sampled tokens under policy and reference.
        mask: [B, R] 1 on completion tokens (each row has at least one).
        kl_coef: weight of the KL penalty.
    Returns:
        (rewards [B, R], kl [B, R]) with both 0 where mask is 0; kl is the per-token estimate
        log pi - log pi_ref of the sampled tokens (its sum over a row estimates KL(pi || pi_ref)).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.long() * torch.arange(mask.size(1), device=mask.device)).argmax(dim=1)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens.

    Args:
        rewards: [B, R] per-token rewards.
        values: [B, R] value estimates V(s_t) (detached).
        mask: [B, R] 1 on completion tokens; the episode ends at a row's last 1 (V after it is 0).
        gamma: discount; lam: GAE lambda (1: Monte-Carlo returns, 0: one-step TD).
    Returns:
        (advantages [B, R], returns [B, R]), 0 where mask is 0.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.size(1)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * (mask[:, t + 1] if t + 1 < length else 0.0)
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    """Scalar clipped surrogate loss (mean over masked-in tokens)."""
    clip_fraction: torch.Tensor
    """Scalar: fraction of tokens where the clipped term was the one used."""
    approx_kl: torch.Tensor
    """Scalar: mean of 0.5 (log pi - log pi_old)^2, how far this update moved from the rollout policy."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped surrogate loss over completion tokens (see module docstring).

    Args:
        logprobs: [B, R] log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: [B, R] the same at rollout time (detached).
        advantages: [B, R] advantage per token (detached).
        mask: [B, R] 1 on completion tokens.
        clip: epsilon of the ratio clip.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return PolicyLoss(loss, clip_fraction.detach(), approx_kl)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (see module docstring).

    Args:
        values: [B, R] current value predictions (with grad); old_values: [B, R] at rollout time.
        returns: [B, R] GAE returns (targets); mask: [B, R]; clip: how far V may move from V_old.
    Returns:
        (loss scalar, clip fraction scalar).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask).detach()


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_samples: int) -> float:
    """One step of the adaptive KL controller of Ziegler et al. 2019 (section 2.2):

        e = clip(KL / target - 1, -0.2, 0.2);   coef <- coef * (1 + e * n_samples / horizon)

    `kl` is the observed mean KL(pi || pi_ref) per completion, `n_samples` the completions in the
    batch, `horizon` the number of samples over which the coefficient may change by ~e^0.2.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_samples / horizon)
