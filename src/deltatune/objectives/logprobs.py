"""Per-token log-probabilities and masked reductions shared by the preference and RL objectives.

DPO, PPO and GRPO all score a completion by the log-probability the model gives each of its
tokens; PPO and GRPO then average over the completion tokens only (a `mask` of 1 on completion
tokens, 0 on prompt and padding).
"""

from __future__ import annotations

import torch

__all__ = ["token_logprobs", "masked_sum", "masked_mean", "masked_whiten"]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[b, t] | ...) read from `logits[b, t]`.

    Args:
        logits: [B, T, V] scores for the token at each position (already shifted: `logits[:, t]`
            predicts `tokens[:, t]`); computed in fp32 whatever their dtype.
        tokens: [B, T] token ids (any value where the mask will be 0, e.g. padding).
        temperature: logits are divided by it first, so the log-probs are those of the sampling
            distribution a rollout used.
    Returns:
        [B, T] fp32 log-probabilities.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax then gather; logsumexp keeps the [B, T, V] intermediate to one tensor
    picked = torch.gather(logits, -1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1 (over `dim`, or everything)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or everything); 0 where nothing is masked in."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `values` to unit variance (and zero mean unless `shift_mean` is False) using the
    statistics of the masked-in entries only; masked-out entries come back as 0.

    The variance is the unbiased one (as in the PPO implementations of Ziegler et al. 2019 and TRL).
    """
    mean = masked_mean(values, mask)
    centred = values - mean
    count = mask.sum()
    var = masked_sum(centred**2, mask) / (count - 1).clamp(min=1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
