"""Shared parts of the preference and RL recipes: scoring forward passes, rollouts, reward sources."""

from deltatune.rlhf.rewards import FunctionReward, ModelReward, RewardSource, build_reward, load_reward_fn
from deltatune.rlhf.rollout import Rollout, completion_mask, encode_prompts, generate_rollout
from deltatune.rlhf.scoring import ValueHead, completion_logprobs, position_ids, reward_scores, sequence_logps

__all__ = [
    "FunctionReward",
    "ModelReward",
    "RewardSource",
    "Rollout",
    "ValueHead",
    "build_reward",
    "completion_logprobs",
    "completion_mask",
    "encode_prompts",
    "generate_rollout",
    "load_reward_fn",
    "position_ids",
    "reward_scores",
    "sequence_logps",
]
