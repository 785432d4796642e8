"""RLHF with PPO (Ouyang et al. 2022; Schulman et al. 2017; Ziegler et al. 2019).

Reads top to bottom: run directory -> prompts -> reward source -> policy (model + delta) and a
value head -> for each step: sample completions, score them, per-token KL-penalised rewards, GAE,
then several PPO epochs of clipped policy + value updates; adapt the KL coefficient -> save.

The reference model is the policy with its delta disabled (no second copy); the value head is a
small linear map on the policy's last hidden state (shared body, as TRL's value-head models).
Dropout stays off throughout (the model is in eval mode), so the log-probs an update recomputes
match the ones the rollout was sampled from, and the first PPO ratio is 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

from deltatune.config import RunConfig
from deltatune.errors import TrainingError
from deltatune.models import load_model, load_tokenizer
from deltatune.objectives.logprobs import masked_mean, masked_whiten
from deltatune.objectives.ppo import (
    adaptive_kl_coef,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from deltatune.recipes.common import attach_deltas, finish_run, start_run
from deltatune.rlhf.common import (
    evaluate_policy,
    load_prompt_data,
    minibatches,
    prompt_stream,
    resume_rl,
    rl_steps,
    save_rl_checkpoint,
    sequence_kl,
)
from deltatune.rlhf.rewards import FunctionReward, build_reward
from deltatune.rlhf.rollout import encode_prompts, generate_rollout
from deltatune.rlhf.scoring import ValueHead, completion_logprobs
from deltatune.train.logs import RunLogger
from deltatune.train.loop import Interrupted, _stop_on_signals, autocast_for, check_precision, resolve_device
from deltatune.train.optim import build_optimizer, build_schedule

__all__ = ["run"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Optimise `cfg.model` (with its delta) against a reward with PPO; return the run's summary."""
    # --- setup: run directory, prompts, reward source (all before the policy loads) ---------------
    run_dir = start_run(cfg, log)
    ppo, train_cfg = cfg.ppo, cfg.train
    tokenizer = load_tokenizer(cfg.model)
    prompts, held_out = load_prompt_data(cfg, log)
    device = resolve_device(train_cfg.device)
    check_precision(train_cfg, device)
    reward = build_reward(ppo.reward_model, ppo.reward_fn, device)
    check = FunctionReward(ppo.eval_reward_fn) if ppo.eval_reward_fn else None

    # --- policy + delta, value head; the reference is the policy with the delta disabled ----------
    model, _ = load_model(cfg.model, task="causal-lm", quantize=cfg.quantize)
    deltas = attach_deltas(model, cfg, device, log)
    value_head = ValueHead(model.config.hidden_size).to(device)
    model.eval()  # no dropout: rollout and update log-probs come from the same function
    params = [*deltas.named_parameters(), *(("value_head." + n, p) for n, p in value_head.named_parameters())]
    steps = rl_steps(train_cfg, len(prompts), ppo.prompts_per_step)
    minibatch = train_cfg.batch_size * train_cfg.grad_accum
    updates_per_step = ppo.epochs * math.ceil(ppo.prompts_per_step / minibatch)
    optimizer = build_optimizer(params, train_cfg)
    schedule = build_schedule(optimizer, train_cfg, steps * updates_per_step)
    stream = prompt_stream(prompts, ppo.prompts_per_step, train_cfg.seed)
    shuffler = torch.Generator().manual_seed(train_cfg.seed)
    kl_coef, start = ppo.kl_coef, 0
    state = resume_rl(run_dir, deltas, {"value_head": value_head}, optimizer, log) if cfg.resume else None
    if state is not None:
        schedule.load_state_dict(state["schedule"])
        stream.load_state_dict(state["stream"])
        shuffler.set_state(state["shuffler"])
        kl_coef, start = state["kl_coef"], state["step"]

    def evaluate() -> dict[str, float]:
        return evaluate_policy(model, deltas, tokenizer, held_out, reward, ppo, cfg, check)

    def checkpoint(step: int):
        loop_state = {"schedule": schedule.state_dict(), "stream": stream.state_dict(), "kl_coef": kl_coef}
        loop_state["shuffler"] = shuffler.get_state()
        return save_rl_checkpoint(run_dir, step, deltas, {"value_head": value_head}, optimizer, loop_state, train_cfg.keep_checkpoints)

    def score(part, with_values: bool = True):
        """(log-probs, values) of a rollout's completion tokens under the current model."""
        with autocast_for(train_cfg, device):
            return completion_logprobs(
                model, part.input_ids, part.attention_mask, part.prompt_length, ppo.temperature,
                value_head if with_values else None,
            )

    def ppo_update(rollout, old_logprobs, old_values, advantages, returns) -> dict[str, float]:
        """`ppo.epochs` passes over the rollout in shuffled minibatches; mean statistics."""
        sums: dict[str, float] = {}
        for _ in range(ppo.epochs):
            for index in minibatches(len(rollout), minibatch, shuffler):
                for micro in index.split(train_cfg.batch_size):
                    part = rollout.select(micro)
                    width = part.mask.size(1)
                    logprobs, values = score(part)
                    mask = part.mask.float()
                    policy = ppo_policy_loss(logprobs, old_logprobs[micro, :width], advantages[micro, :width], mask, ppo.clip)
                    value_loss, value_clip = ppo_value_loss(
                        values, old_values[micro, :width], returns[micro, :width], mask, ppo.vf_clip
                    )
                    loss = policy.loss + ppo.vf_coef * value_loss
                    if not torch.isfinite(loss):
                        raise TrainingError(f"the PPO loss became {float(loss)}; try a lower train.lr or kl_coef")
                    (loss * len(micro) / len(index)).backward()
                    weight = len(micro) / (len(rollout) * ppo.epochs)
                    for key, value in (
                        ("policy_loss", policy.loss),
                        ("value_loss", value_loss),
                        ("clip_fraction", policy.clip_fraction),
                        ("value_clip_fraction", value_clip),
                        ("approx_kl", policy.approx_kl),
                    ):
                        sums[key] = sums.get(key, 0.0) + float(value.detach()) * weight
                if train_cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], train_cfg.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        return sums

    # --- held-out reward of the base model, then the PPO loop ------------------------------------------
    base = None
    if held_out:
        with deltas.disabled():
            base = evaluate()
        log(f"base model on {min(len(held_out), ppo.eval_prompts)} held-out prompts: " + _fmt(base))
    logger = RunLogger(run_dir, steps, start)
    last_eval: dict[str, float] = {}
    try:
        with _stop_on_signals() as stop:
            for step in range(start + 1, steps + 1):
                started, batch = time.perf_counter(), next(stream)
                # 1. rollout: sample, score, log-probs of policy and reference, values
                ids = encode_prompts(tokenizer, batch, cfg.data.max_length, cfg.data.system)
                rollout = generate_rollout(model, tokenizer, ids, ppo.max_new_tokens, ppo.temperature, ppo.top_p)
                scores = reward(batch, rollout.completions).to(device)
                penalised = scores - ppo.missing_eos_penalty * (~rollout.finished).float()
                mask = rollout.mask.float()
                with torch.no_grad():
                    old_logprobs, old_values = score(rollout)
                    with deltas.disabled():
                        ref_logprobs, _ = score(rollout, with_values=False)
                # 2. per-token rewards with the KL penalty, GAE advantages and returns
                rewards, _ = kl_penalized_rewards(penalised, old_logprobs, ref_logprobs, mask, kl_coef)
                advantages, returns = gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
                if ppo.whiten_advantages:
                    advantages = masked_whiten(advantages, mask)
                # 3. PPO epochs
                lr = schedule.get_last_lr()[0]
                stats = ppo_update(rollout, old_logprobs, old_values, advantages, returns)
                # 4. KL control, logging, evaluation, checkpoints
                kl = float(sequence_kl(old_logprobs, ref_logprobs, mask).mean())
                record = {
                    "reward": float(scores.mean()),
                    "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                    "kl": kl,
                    "kl_coef": kl_coef,
                    **stats,
                    "value_mean": float(masked_mean(old_values, mask)),
                    "returns_mean": float(masked_mean(returns, mask)),
                    "length": float(mask.sum(1).mean()),
                    "finished": float(rollout.finished.float().mean()),
                    "lr": lr,
                }
                if ppo.kl_target:
                    kl_coef = adaptive_kl_coef(kl_coef, kl, ppo.kl_target, ppo.kl_horizon, len(rollout))
                if held_out and train_cfg.eval_every and step % train_cfg.eval_every == 0 and step != steps:
                    last_eval = evaluate()
                    record.update({f"eval_{k}": v for k, v in last_eval.items()})
                    logger.write(f"step {step}: held-out " + _fmt(last_eval))
                record["step_s"] = time.perf_counter() - started
                logger.log(step, record)
                logger.bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{kl:.3f}", refresh=False)
                logger.bar.update(1)
                if stop["stop"]:
                    raise Interrupted(step, checkpoint(step))
                if train_cfg.save_every and step % train_cfg.save_every == 0 and step != steps:
                    checkpoint(step)
            if held_out:
                last_eval = evaluate()
                logger.log(steps, {f"eval_{k}": v for k, v in last_eval.items()})
                logger.write("final held-out " + _fmt(last_eval))
            if steps > start:
                checkpoint(steps)
    finally:
        logger.close()

    # --- save: adapter, value head, summary ---------------------------------------------------------
    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(run_dir / "value_head.safetensors"))
    return finish_run(
        cfg, run_dir, deltas, None, device, log,
        {"steps": steps, "kl_coef": kl_coef, "eval": {"base": base, "tuned": last_eval} if base is not None else None},
        chat_tokenizer=tokenizer,
    )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
