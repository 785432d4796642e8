"""What the PPO and GRPO recipes share around their update: prompt data and its resumable
stream, the number of steps, minibatching, held-out evaluation of the policy, and checkpoints
that also hold extra modules (the value head) and controller state (the KL coefficient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltatune.config import RolloutConfig, RunConfig, TrainConfig
from deltatune.data.loader import BatchStream
from deltatune.data.preference import PromptExample, load_prompts, split_records
from deltatune.deltas import DeltaSet
from deltatune.errors import DataError
from deltatune.objectives.logprobs import masked_sum
from deltatune.rlhf.rewards import RewardSource
from deltatune.rlhf.rollout import Rollout, encode_prompts, generate_rollout
from deltatune.rlhf.scoring import completion_logprobs
from deltatune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state

__all__ = [
    "load_prompt_data",
    "prompt_stream",
    "rl_steps",
    "minibatches",
    "sequence_kl",
    "evaluate_policy",
    "save_rl_checkpoint",
    "resume_rl",
]


def load_prompt_data(cfg: RunConfig, log: Callable[[str], None]) -> tuple[list[PromptExample], list[PromptExample]]:
    """Training and held-out prompts (`data.eval`, or `data.eval_split` of the training file)."""
    train_records, eval_records = split_records(cfg.data.train, cfg.data.eval, cfg.data.eval_split, cfg.train.seed)
    train, held_out = load_prompts(train_records), load_prompts(eval_records)
    log(f"prompts: {len(train)} for training, {len(held_out)} held out")
    return train, held_out


def prompt_stream(prompts: Sequence[PromptExample], per_step: int, seed: int) -> BatchStream:
    """Endless, resumable stream of `per_step` prompts at a time (a reshuffle every epoch)."""
    if len(prompts) < per_step:
        raise DataError(f"{len(prompts)} training prompts are fewer than prompts_per_step={per_step}")
    return BatchStream(prompts, per_step, pad_id=0, seed=seed, collate_fn=lambda items, _pad: list(items))


def rl_steps(cfg: TrainConfig, num_prompts: int, per_step: int) -> int:
    """Rollout steps: `train.max_steps`, else `train.epochs` passes over the prompts (default 1)."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil((cfg.epochs or 1.0) * num_prompts / per_step))


def minibatches(size: int, minibatch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """A random split of range(size) into index tensors of at most `minibatch` items."""
    order = torch.randperm(size, generator=generator)
    yield from order.split(minibatch)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sum over each completion of log pi - log pi_ref: on samples of pi, an unbiased estimate of
    KL(pi || pi_ref) for that prompt (nats per completion)."""
    return masked_sum(logprobs - ref_logprobs, mask, dim=1)


@torch.no_grad()
def evaluate_policy(
    model: nn.Module,
    deltas: DeltaSet,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[PromptExample],
    reward: RewardSource,
    rollout: RolloutConfig,
    cfg: RunConfig,
    check: RewardSource | None = None,
) -> dict[str, float]:
    """Mean reward of greedy completions of the held-out prompts (`reward`), and on one seeded
    sample per prompt: the mean reward (`reward_sampled`), the KL to the reference per completion
    (`kl`), the completion length in tokens and the fraction that ended before max_new_tokens.
    With a `check` reward (`eval_reward_fn`), its means on the same completions (`check`,
    `check_sampled`)."""
    prompts = list(prompts)[: rollout.eval_prompts]
    ids = encode_prompts(tokenizer, prompts, cfg.data.max_length, cfg.data.system)
    greedy = generate_rollout(model, tokenizer, ids, rollout.max_new_tokens, greedy=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 12345)
        sampled = generate_rollout(model, tokenizer, ids, rollout.max_new_tokens, rollout.temperature, rollout.top_p)
    logprobs, _ = _logprobs(model, sampled, rollout.temperature)
    with deltas.disabled():
        ref_logprobs, _ = _logprobs(model, sampled, rollout.temperature)
    out = {
        "reward": float(reward(prompts, greedy.completions).mean()),
        "reward_sampled": float(reward(prompts, sampled.completions).mean()),
        "kl": float(sequence_kl(logprobs, ref_logprobs, sampled.mask.float()).mean()),
        "length": float(sampled.mask.sum(1).float().mean()),
        "finished": float(sampled.finished.float().mean()),
    }
    if check is not None:
        out["check"] = float(check(prompts, greedy.completions).mean())
        out["check_sampled"] = float(check(prompts, sampled.completions).mean())
    return out


def _logprobs(model: nn.Module, rollout: Rollout, temperature: float):
    return completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, temperature)


def save_rl_checkpoint(
    run_dir: Path,
    step: int,
    deltas: DeltaSet,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """A resumable checkpoint of the deltas, extra `modules` (saved under `<name>.` keys) and loop `state`."""
    weights = dict(deltas.state_dict())
    for name, module in modules.items():
        weights.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return save_checkpoint(run_dir, step, weights, optimizer, state, keep=keep)


def resume_rl(
    run_dir: Path,
    deltas: DeltaSet,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    """Load the newest checkpoint into deltas, modules and optimizer; its loop state, or None."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        log(f"resume: no checkpoint in {run_dir}; starting from step 0")
        return None
    weights, optim_state, state = load_checkpoint(checkpoint)
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    deltas.load_state_dict({k: v for k, v in weights.items() if not any(k.startswith(f"{n}.") for n in modules)})
    optimizer.load_state_dict(optim_state)
    set_rng_state(state["rng"])
    log(f"resumed from {checkpoint} (step {state['step']})")
    return state
