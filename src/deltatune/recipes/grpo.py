"""Group relative policy optimisation (GRPO; Shao et al. 2024, DeepSeekMath).

Reads top to bottom: run directory -> prompts -> reward source -> policy (model + delta) -> for
each step: sample `group_size` completions per prompt, score them, normalise the rewards within
each group into advantages, then clipped policy updates with a k3 KL penalty to the reference ->
save. There is no value model: the group is the baseline, which is what makes GRPO cheaper than
PPO.

The reference is the policy with its delta disabled (no second copy). Dropout stays off (the model
is in eval mode), so the first update's ratio is exactly 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from deltatune.config import RunConfig
from deltatune.errors import TrainingError
from deltatune.models import load_model, load_tokenizer
from deltatune.objectives.grpo import group_advantages, grpo_loss
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
from deltatune.rlhf.scoring import completion_logprobs
from deltatune.train.logs import RunLogger
from deltatune.train.loop import Interrupted, _stop_on_signals, autocast_for, check_precision, resolve_device
from deltatune.train.optim import build_optimizer, build_schedule

__all__ = ["run"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Optimise `cfg.model` (with its delta) against a reward with GRPO; return the run's summary."""
    # --- setup: run directory, prompts, reward source (all before the policy loads) ---------------
    run_dir = start_run(cfg, log)
    grpo, train_cfg = cfg.grpo, cfg.train
    tokenizer = load_tokenizer(cfg.model)
    prompts, held_out = load_prompt_data(cfg, log)
    device = resolve_device(train_cfg.device)
    check_precision(train_cfg, device)
    reward = build_reward(grpo.reward_model, grpo.reward_fn, device)
    check = FunctionReward(grpo.eval_reward_fn) if grpo.eval_reward_fn else None

    # --- policy + delta; the reference is the policy with the delta disabled ----------------------
    model, _ = load_model(cfg.model, task="causal-lm", quantize=cfg.quantize)
    deltas = attach_deltas(model, cfg, device, log)
    model.eval()  # no dropout: rollout and update log-probs come from the same function
    params = list(deltas.named_parameters())
    completions_per_step = grpo.prompts_per_step * grpo.group_size
    minibatch = train_cfg.batch_size * train_cfg.grad_accum
    updates_per_step = grpo.epochs * math.ceil(completions_per_step / minibatch)
    steps = rl_steps(train_cfg, len(prompts), grpo.prompts_per_step)
    optimizer = build_optimizer(params, train_cfg)
    schedule = build_schedule(optimizer, train_cfg, steps * updates_per_step)
    stream = prompt_stream(prompts, grpo.prompts_per_step, train_cfg.seed)
    shuffler = torch.Generator().manual_seed(train_cfg.seed)
    start = 0
    state = resume_rl(run_dir, deltas, {}, optimizer, log) if cfg.resume else None
    if state is not None:
        schedule.load_state_dict(state["schedule"])
        stream.load_state_dict(state["stream"])
        shuffler.set_state(state["shuffler"])
        start = state["step"]

    def evaluate() -> dict[str, float]:
        return evaluate_policy(model, deltas, tokenizer, held_out, reward, grpo, cfg, check)

    def checkpoint(step: int):
        loop_state = {"schedule": schedule.state_dict(), "stream": stream.state_dict(), "shuffler": shuffler.get_state()}
        return save_rl_checkpoint(run_dir, step, deltas, {}, optimizer, loop_state, train_cfg.keep_checkpoints)

    def logprobs_of(part) -> torch.Tensor:
        """Log-probs of a rollout's completion tokens under the current model."""
        with autocast_for(train_cfg, device):
            return completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length, grpo.temperature)[0]

    def grpo_update(rollout, advantages, old_logprobs, ref_logprobs) -> dict[str, float]:
        """`grpo.epochs` passes over the completions in shuffled minibatches; mean statistics.
        `old_logprobs` is None when there is a single update per rollout (then ratio = 1 exactly)."""
        sums: dict[str, float] = {}
        for _ in range(grpo.epochs):
            for index in minibatches(len(rollout), minibatch, shuffler):
                for micro in index.split(train_cfg.batch_size):
                    part = rollout.select(micro)
                    width = part.mask.size(1)
                    logprobs = logprobs_of(part)
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[micro, :width]
                    ref = ref_logprobs[micro, :width] if ref_logprobs is not None else logprobs.detach()
                    out = grpo_loss(
                        logprobs, old, ref, advantages[micro], part.mask.float(), grpo.clip, grpo.beta, grpo.loss_type
                    )
                    if not torch.isfinite(out.loss):
                        raise TrainingError(f"the GRPO loss became {float(out.loss)}; try a lower train.lr")
                    (out.loss * len(micro) / len(index)).backward()
                    weight = len(micro) / (len(rollout) * grpo.epochs)
                    for key, value in (("loss", out.loss), ("kl_k3", out.kl), ("clip_fraction", out.clip_fraction)):
                        sums[key] = sums.get(key, 0.0) + float(value.detach()) * weight
                    if old_logprobs is None:  # single update: this pass is the rollout policy itself
                        kl = sequence_kl(logprobs.detach(), ref, part.mask.float()).sum()
                        sums["kl"] = sums.get("kl", 0.0) + float(kl) / len(rollout)
                if train_cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], train_cfg.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
        return sums

    # --- held-out reward of the base model, then the GRPO loop -----------------------------------------
    base = None
    if held_out:
        with deltas.disabled():
            base = evaluate()
        log(f"base model on {min(len(held_out), grpo.eval_prompts)} held-out prompts: " + _fmt(base))
    logger = RunLogger(run_dir, steps, start)
    last_eval: dict[str, float] = {}
    try:
        with _stop_on_signals() as stop:
            for step in range(start + 1, steps + 1):
                started, batch = time.perf_counter(), next(stream)
                # 1. rollout: group_size completions per prompt (a group's members sit next to each other)
                group = [p for p in batch for _ in range(grpo.group_size)]
                ids = encode_prompts(tokenizer, group, cfg.data.max_length, cfg.data.system)
                rollout = generate_rollout(model, tokenizer, ids, grpo.max_new_tokens, grpo.temperature, grpo.top_p)
                scores = reward(group, rollout.completions).to(device)
                penalised = scores - grpo.missing_eos_penalty * (~rollout.finished).float()
                # 2. group-normalised advantages; rollout-time and reference log-probs
                advantages = group_advantages(penalised, grpo.group_size, grpo.scale_rewards)
                with torch.no_grad():
                    old_logprobs = logprobs_of(rollout) if updates_per_step > 1 else None
                    ref_logprobs = None
                    if grpo.beta:
                        with deltas.disabled():
                            ref_logprobs = logprobs_of(rollout)
                # 3. clipped policy updates with the KL penalty
                lr = schedule.get_last_lr()[0]
                stats = grpo_update(rollout, advantages, old_logprobs, ref_logprobs)
                # 4. logging, evaluation, checkpoints
                mask = rollout.mask.float()
                if old_logprobs is not None and ref_logprobs is not None:
                    stats["kl"] = float(sequence_kl(old_logprobs, ref_logprobs, mask).mean())
                record = {
                    "reward": float(scores.mean()),
                    "reward_std": float(scores.view(-1, grpo.group_size).std(dim=1).mean()),
                    **stats,
                    "length": float(mask.sum(1).mean()),
                    "finished": float(rollout.finished.float().mean()),
                    "lr": lr,
                }
                if held_out and train_cfg.eval_every and step % train_cfg.eval_every == 0 and step != steps:
                    last_eval = evaluate()
                    record.update({f"eval_{k}": v for k, v in last_eval.items()})
                    logger.write(f"step {step}: held-out " + _fmt(last_eval))
                record["step_s"] = time.perf_counter() - started
                logger.log(step, record)
                logger.bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{stats.get('kl_k3', 0.0):.4f}", refresh=False)
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

    # --- save ----------------------------------------------------------------------------------------
    return finish_run(
        cfg, run_dir, deltas, None, device, log,
        {"steps": steps, "eval": {"base": base, "tuned": last_eval} if base is not None else None},
        chat_tokenizer=tokenizer,
    )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
