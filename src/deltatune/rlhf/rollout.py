"""Rollouts for PPO and GRPO: batched sampling from the policy and the completion mask.

Prompts are rendered as in training (`data.preference.prompt_text`: the chat template with the
generation prompt for chat models), left-padded into one batch and completed with Hugging Face
`generate` (KV cache on, the model in eval mode). A completion's tokens count up to and including
its first end-of-sequence token; everything after it is padding (mask 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltatune.data.preference import PromptExample, encode_prompt

__all__ = ["Rollout", "encode_prompts", "generate_rollout", "completion_mask"]


@dataclass
class Rollout:
    """A batch of prompts and their sampled completions (all tensors on the model's device)."""

    input_ids: torch.Tensor
    """[B, P + R] left-padded prompt ids, then completion ids (padded after each completion's end)."""
    attention_mask: torch.Tensor
    """[B, P + R] 1 on prompt and completion tokens."""
    prompt_length: int
    """P: the width of the (left-padded) prompt part."""
    mask: torch.Tensor
    """[B, R] 1 on completion tokens (through the first EOS)."""
    finished: torch.Tensor
    """[B] bool: the completion ended with EOS within the token budget."""
    completions: list[str]
    """The completions as text (special tokens removed)."""

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows `index` (a 1-D long tensor), trimmed to their longest completion."""
        mask = self.mask[index]
        width = int(mask.sum(1).max()) if len(index) else 0
        end = self.prompt_length + max(width, 1)
        return Rollout(
            self.input_ids[index, :end],
            self.attention_mask[index, :end],
            self.prompt_length,
            mask[:, : end - self.prompt_length],
            self.finished[index],
            [self.completions[i] for i in index.tolist()],
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[PromptExample], max_length: int, system: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt as the model will see it, keeping the last `max_length` tokens."""
    return [encode_prompt(tokenizer, example.prompt, system)[-max_length:] for example in prompts]


def completion_mask(completions: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R], finished [B]) for generated ids [B, R]: 1 through the first EOS token."""
    is_eos = torch.isin(completions, torch.tensor(list(eos_ids), device=completions.device))
    finished = is_eos.any(dim=1)
    # tokens strictly after the first EOS have a preceding EOS: exclusive cumulative count > 0
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after).long(), finished


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()
def generate_rollout(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """Sample (or greedily decode) one completion per prompt, batched.

    Sampling uses exactly softmax(logits / temperature) (top-k off; top-p only when set below 1),
    so the log-probs recomputed for the update are those of the distribution that was sampled.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for b, ids in enumerate(prompt_ids):
        input_ids[b, width - len(ids) :] = torch.tensor(ids)
        attention[b, width - len(ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    was_training = model.training
    model.eval()
    sampling = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    )
    eos = _eos_ids(model, tokenizer)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
        **sampling,
    )
    model.train(was_training)
    completions = out[:, width:]
    mask, finished = completion_mask(completions, eos)
    texts = tokenizer.batch_decode(completions * mask + pad * (1 - mask), skip_special_tokens=True)
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([attention, mask], dim=1),
        prompt_length=width,
        mask=mask,
        finished=finished,
        completions=[t.strip() for t in texts],
    )
