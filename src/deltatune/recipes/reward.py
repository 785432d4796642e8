"""Reward modelling: a scalar head trained on preference pairs with the Bradley–Terry loss.

Reads top to bottom: run directory -> pairs -> sequence-classification model (one label; a
decoder is read at its last real token) + delta + a trainable head -> train -> save.
The held-out pairwise accuracy is measured before training (the untrained head, i.e. the model
with its deltas disabled) and after; the run directory is then usable as `ppo.reward_model` or
`grpo.reward_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deltatune.config import RunConfig
from deltatune.data import BatchStream, eval_batches
from deltatune.data.preference import build_pair_data, collate_pairs
from deltatune.models import load_model, load_tokenizer
from deltatune.objectives.reward import bradley_terry_loss, pairwise_accuracy
from deltatune.recipes.common import attach_deltas, classifier_head, finish_run, start_run
from deltatune.rlhf.metrics import reward_metrics
from deltatune.rlhf.scoring import reward_scores
from deltatune.train.loop import autocast_for, resolve_device, train

__all__ = ["run"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a reward model on `cfg.data` (prompt/chosen/rejected) and return the run's summary."""
    # --- setup: run directory, seed, pairs (before the model: bad data fails fast) -------------
    run_dir = start_run(cfg, log)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, reports = build_pair_data(cfg.data, tokenizer, cfg.train.seed)
    for report in reports:
        log("\n".join(report.lines()))

    # --- model: one-label classifier + delta + trainable head ------------------------------------
    device = resolve_device(cfg.train.device)
    model, _ = load_model(cfg.model, task="seq-cls", num_labels=1, quantize=cfg.quantize)
    deltas = attach_deltas(model, cfg, device, log, head=classifier_head)
    pad = tokenizer.pad_token_id

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        chosen, rejected = reward_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
        losses = bradley_terry_loss(chosen, rejected, batch.get("margin"), cfg.reward.center_coef)
        metrics = {"accuracy": pairwise_accuracy(chosen, rejected).sum(), "margin": (chosen - rejected).sum()}
        return losses.sum(), len(chosen), metrics

    def eval_fn() -> dict[str, float]:
        batches = eval_batches(eval_rows, cfg.train.batch_size, pad, lambda rows, _epoch: collate_pairs(rows, pad))
        return reward_metrics(model, batches, autocast=lambda: autocast_for(cfg.train, device))

    # --- held-out accuracy of the untrained head, then train ----------------------------------------
    base = None
    if eval_rows:
        with deltas.disabled():
            base = eval_fn()
        log(f"before training: held-out pairwise accuracy {base['accuracy']:.3f}, margin {base['margin']:.3f}")
    stream = BatchStream(train_rows, cfg.train.batch_size, pad, seed=cfg.train.seed, collate_fn=lambda rows, _epoch: collate_pairs(rows, pad))
    result = train(
        model,
        deltas,
        stream,
        loss_fn,
        lambda batch: batch["index"].numel(),
        cfg.train,
        run_dir,
        eval_fn=eval_fn if eval_rows else None,
        resume=cfg.resume,
        log=log,
    )
    if base is not None:
        tuned = result.final_eval_metrics
        log(f"after training: held-out pairwise accuracy {tuned['accuracy']:.3f} (before {base['accuracy']:.3f})")

    # --- save --------------------------------------------------------------------------------------
    return finish_run(
        cfg, run_dir, deltas, result, device, log,
        {
            "eval": {"base": base, "tuned": result.final_eval_metrics} if base is not None else None,
            "train_pairs": len(train_rows),
            "eval_pairs": len(eval_rows),
        },
        chat_tokenizer=tokenizer,
    )
