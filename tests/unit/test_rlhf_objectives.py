"""Preference and RL objectives against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.objectives.dpo import dpo_loss
from deltatune.objectives.grpo import group_advantages, grpo_loss, k3_kl
from deltatune.objectives.logprobs import masked_mean, masked_whiten, token_logprobs
from deltatune.objectives.ppo import (
    adaptive_kl_coef,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from deltatune.objectives.reward import bradley_terry_loss, last_token_scores, pairwise_accuracy


def nll_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


# ---- reward model -----------------------------------------------------------------------------------

def test_bradley_terry_by_hand():
    losses = bradley_terry_loss(t([1.0, 0.0]), t([0.0, 2.0]))
    assert losses.tolist() == pytest.approx([nll_sigmoid(1.0), nll_sigmoid(-2.0)], abs=1e-6)  # 0.3133, 2.1269
    with_margin = bradley_terry_loss(t([1.0]), t([0.0]), margin=t([0.5]))
    assert with_margin.item() == pytest.approx(nll_sigmoid(0.5), abs=1e-6)
    centred = bradley_terry_loss(t([1.0]), t([0.0]), center_coef=0.1)
    assert centred.item() == pytest.approx(nll_sigmoid(1.0) + 0.1 * 1.0, abs=1e-6)


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy(t([2.0, 0.0, 1.0]), t([1.0, 3.0, 1.0])).tolist() == [1.0, 0.0, 0.5]


def test_last_token_scores_left_and_right_padding():
    scores = t([[1, 2, 3, 4], [5, 6, 7, 8]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_scores(scores, right).tolist() == [2.0, 8.0]
    assert last_token_scores(scores, left).tolist() == [4.0, 8.0]


# ---- DPO ----------------------------------------------------------------------------------------------

def test_dpo_losses_by_hand():
    # h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2 for pair 0; (-2 + 1) - (-1 + 1) = -1 for pair 1
    pc, pr, rc, rr = t([-1.0, -2.0]), t([-3.0, -1.0]), t([-2.0, -1.0]), t([-2.0, -1.0])
    beta = 0.5
    sigmoid = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    assert sigmoid.losses.tolist() == pytest.approx([nll_sigmoid(1.0), nll_sigmoid(-0.5)], abs=1e-6)
    assert sigmoid.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert sigmoid.rejected_rewards.tolist() == pytest.approx([-0.5, 0.0])
    ipo = dpo_loss(pc, pr, rc, rr, beta, "ipo")  # (h - 1/(2 beta))^2 = (h - 1)^2
    assert ipo.losses.tolist() == pytest.approx([1.0, 4.0])
    hinge = dpo_loss(pc, pr, rc, rr, beta, "hinge")  # max(0, 1 - beta h)
    assert hinge.losses.tolist() == pytest.approx([0.0, 1.5])
    smoothed = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=0.1)
    expected = 0.9 * nll_sigmoid(1.0) + 0.1 * nll_sigmoid(-1.0)
    assert smoothed.losses[0].item() == pytest.approx(expected, abs=1e-6)


def test_dpo_at_the_reference_is_log_2():
    logps = t([-4.0, -7.0])
    out = dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert pairwise_accuracy(out.chosen_rewards, out.rejected_rewards).tolist() == [0.5, 0.5]


# ---- PPO ----------------------------------------------------------------------------------------------

def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    rewards, kl = kl_penalized_rewards(
        scores=t([1.0, 2.0]),
        logprobs=t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
        ref_logprobs=t([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]]),
        mask=t([[1, 1, 0], [1, 1, 1]]),
        kl_coef=0.1,
    )
    close(kl, [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 1.0, 0.0], [0.0, 0.0, 2.0]])


def test_gae_by_hand():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 0.6, 99.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03; d0 = .9*.6 - .5 = .04; gamma*lam = .72
    a2, a1 = 0.3, 0.03 + 0.72 * 0.3
    a0 = 0.04 + 0.72 * a1
    # row 1 ends at t=1 (the masked reward 9 and value 99 must not leak): d1 = 2 - .6; d0 = .9*.6 - .5
    b1 = 1.4
    b0 = 0.04 + 0.72 * b1
    close(advantages, [[a0, a1, a2], [b0, b1, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 0.6, a2 + 0.7], [b0 + 0.5, b1 + 0.6, 0.0]])


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0]])
    close(advantages, [[5.5, 4.5, 2.5]])


def test_ppo_clipped_policy_loss_by_hand():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    logprobs = torch.log(t([[1.5, 0.5, 0.5, 1.1]]))
    advantages = t([[1.0, 1.0, -1.0, 1.0]])
    out = ppo_policy_loss(logprobs, old, advantages, t([[1, 1, 1, 1]]), clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); 1: max(-0.5, -0.8) = -0.5; 2 (A<0): max(0.5, 0.8) = 0.8 (clipped);
    # token 3: ratio 1.1 inside the clip range: -1.1
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 - 1.1) / 4, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    masked = ppo_policy_loss(logprobs, old, advantages, t([[1, 1, 0, 0]]), clip=0.2)
    assert masked.loss.item() == pytest.approx((-1.2 - 0.5) / 2, abs=1e-6)


def test_ppo_value_loss_by_hand():
    loss, clipped = ppo_value_loss(t([[1.0, 2.1]]), t([[0.5, 2.0]]), t([[2.0, 2.0]]), t([[1, 1]]), clip=0.2)
    # token 0: V clipped to 0.7: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.01) / 2, abs=1e-6)
    assert clipped.item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    assert adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, kl=5.7, target=6.0, horizon=100, n_samples=10) == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert adaptive_kl_coef(0.1, kl=0.0, target=6.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 0.98)


# ---- GRPO ---------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    adv = group_advantages(rewards, group_size=4)
    a = 0.5 / (std + 1e-4)
    assert adv.tolist() == pytest.approx([a, -a, -a, a] + [0.0] * 4, abs=1e-6)
    assert adv[[0, 1, 2, 3]].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_k3_kl_by_hand():
    kl = k3_kl(t([[0.0, math.log(0.5)]]), t([[math.log(0.5), math.log(0.5)]]))
    # d = log 0.5: 0.5 - log 0.5 - 1 = 0.19315; identical distributions: 0
    close(kl, [[0.5 + math.log(2) - 1, 0.0]])


def test_grpo_loss_by_hand():
    logprobs = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = logprobs.clone()
    ref[0, 0] = -1.0 + math.log(0.5)  # one token with k3 = 0.19315
    mask = t([[1, 1, 0], [1, 1, 1]])
    advantages = t([1.0, -1.0])
    out = grpo_loss(logprobs, logprobs.detach(), ref, advantages, mask, clip=0.2, beta=0.1, loss_type="sequence")
    k = 0.5 + math.log(2) - 1
    # ratio 1 everywhere: per-token loss -A (+ beta k3); sequence 0: (-1 + 0.1k - 1)/2, sequence 1: +1
    seq0, seq1 = (-2 + 0.1 * k) / 2, 1.0
    assert out.loss.item() == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    assert out.kl.item() == pytest.approx(k / 5, abs=1e-6)
    token = grpo_loss(logprobs, logprobs.detach(), ref, advantages, mask, clip=0.2, beta=0.1, loss_type="token")
    assert token.loss.item() == pytest.approx((-2 + 0.1 * k + 3) / 5, abs=1e-6)


def test_grpo_clips_like_ppo():
    logprobs = torch.log(t([[1.5, 0.5]]))
    out = grpo_loss(logprobs, torch.zeros(1, 2), logprobs, t([1.0]), t([[1, 1]]), clip=0.2, beta=0.0)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5) / 2, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)


# ---- shared ----------------------------------------------------------------------------------------------

def test_token_logprobs_match_log_softmax():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens), expected, atol=1e-6)
    expected_t = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens, temperature=0.7), expected_t, atol=1e-6)


def test_masked_whiten_and_mean():
    values, mask = t([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]]), t([[1, 1, 0], [1, 1, 1]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    white = masked_whiten(values, mask)
    kept = white[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)
    assert white[0, 2].item() == 0.0
