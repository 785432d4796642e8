"""Forward passes that score sequences: completion log-probs (DPO, PPO, GRPO), reward-model
scores, and a PPO value head on the policy's hidden states.

Logits are computed only where a completion token is predicted: the LM head ([H, V], 49k
columns for SmolLM2) is the largest matmul of a small model and most positions are prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.data.tokenize import IGNORE
from deltatune.objectives.clm import _hidden_path_ok
from deltatune.objectives.logprobs import token_logprobs
from deltatune.objectives.reward import last_token_scores

__all__ = ["ValueHead", "position_ids", "sequence_logps", "completion_logprobs", "reward_scores"]


class ValueHead(nn.Module):
    """V(s_t): a linear map from the policy's last hidden state to a scalar, zero-initialised so the
    first advantages are plain (discounted) returns."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> values [...] (fp32)."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding ([B, T]), as `generate` uses: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of a Hugging Face model's body (no head, no cache)."""
    body = getattr(model, model.base_model_prefix)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's label tokens: [N] for a batch with input_ids,
    attention_mask and labels [N, T] (labels[t] is the token at t, IGNORE where not counted)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = torch.arange(labels.size(0), device=labels.device).unsqueeze(1).expand_as(targets)[keep]
    if _hidden_path_ok(model):
        hidden = _hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1][keep]  # [K, H]
        logits = model.get_output_embeddings()(hidden)
    else:
        mask = batch["attention_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits[:, :-1][keep]
    per_token = token_logprobs(logits.unsqueeze(0), targets[keep].unsqueeze(0)).squeeze(0)  # [K]
    return torch.zeros(labels.size(0), device=per_token.device).index_add(0, rows, per_token)


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
    value_head: ValueHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the completion tokens and, with a value head, V(s_t) before each of them.

    Args:
        input_ids, attention_mask: [B, P + R]: left-padded prompts of length P, then completions.
        prompt_length: P.
        temperature: the sampling temperature of the rollout (its distribution is the policy).
    Returns:
        (logprobs [B, R], values [B, R] or None), fp32.
    """
    targets = input_ids[:, prompt_length:]
    if _hidden_path_ok(model):
        hidden = _hidden(model, input_ids, attention_mask)[:, prompt_length - 1 : -1]  # [B, R, H]
        logits = model.get_output_embeddings()(hidden)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            output_hidden_states=value_head is not None,
            use_cache=False,
        )
        logits = out.logits[:, prompt_length - 1 : -1]
        hidden = out.hidden_states[-1][:, prompt_length - 1 : -1] if value_head is not None else None
    logprobs = token_logprobs(logits, targets, temperature)
    values = value_head(hidden) if value_head is not None else None
    return logprobs, values


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row from a sequence-classification model with a single label: [B].

    Decoders (a `score` head over every position) are read at each row's last real token, found
    from the attention mask, so left or right padding and a pad token equal to EOS are all fine;
    encoders use their own pooled output.
    """
    if hasattr(model, "score") and hasattr(model, "base_model_prefix"):
        hidden = _hidden(model, input_ids, attention_mask)  # [B, T, H]
        return last_token_scores(model.score(hidden).squeeze(-1).float(), attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, 1]
    return logits.squeeze(-1).float()
