"""Direct preference optimisation (Rafailov et al. 2023) and its IPO / hinge variants.

Reads top to bottom: run directory -> pairs -> causal LM + delta -> (reference log-probs once)
-> train -> save. The reference model is the same model with its deltas disabled (no second
copy in memory); with `dpo.precompute_ref` its log-probs are computed once for every pair before
training instead of in every step. Held-out metrics (preference accuracy, reward margin, and the
model's own log-prob preference) are measured for the base model and after training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.config import RunConfig
from deltatune.data import BatchStream, eval_batches
from deltatune.data.preference import PairRow, build_pair_data, collate_pairs
from deltatune.deltas import DeltaSet
from deltatune.models import load_model, load_tokenizer
from deltatune.objectives.dpo import dpo_loss
from deltatune.objectives.reward import pairwise_accuracy
from deltatune.recipes.common import attach_deltas, finish_run, start_run
from deltatune.rlhf.metrics import dpo_metrics, pair_logps
from deltatune.rlhf.scoring import sequence_logps
from deltatune.train.loop import autocast_for, resolve_device, train

__all__ = ["run", "reference_logps"]


@torch.no_grad()
def reference_logps(
    model: nn.Module, deltas: DeltaSet, rows: Sequence[PairRow], batch_size: int, pad_id: int, device: torch.device
) -> torch.Tensor:
    """[N, 2] summed (chosen, rejected) completion log-probs of every pair under the reference
    (the model with its deltas disabled), indexed by `PairRow.index`."""
    table = torch.zeros(len(rows), 2)
    was_training = model.training
    model.eval()
    with deltas.disabled():
        for batch in eval_batches(rows, batch_size, pad_id, lambda rows, _epoch: collate_pairs(rows, pad_id)):
            batch = {k: v.to(device) for k, v in batch.items()}
            chosen, rejected = sequence_logps(model, batch).float().cpu().chunk(2)
            table[batch["index"].cpu()] = torch.stack([chosen, rejected], dim=1)
    model.train(was_training)
    return table


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `cfg.model` on preference pairs with DPO and return the run's summary."""
    # --- setup: run directory, seed, pairs (before the model: bad data fails fast) -------------
    run_dir = start_run(cfg, log)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, reports = build_pair_data(cfg.data, tokenizer, cfg.train.seed)
    for report in reports:
        log("\n".join(report.lines()))
    dpo, pad = cfg.dpo, tokenizer.pad_token_id

    # --- policy + delta; the reference is the same model with the delta disabled ---------------
    device = resolve_device(cfg.train.device)
    model, _ = load_model(cfg.model, task="causal-lm", quantize=cfg.quantize)
    deltas = attach_deltas(model, cfg, device, log)
    ref_train = ref_eval = None
    if dpo.precompute_ref:
        log(f"computing reference log-probs of {len(train_rows) + len(eval_rows)} pairs once ...")
        ref_train = reference_logps(model, deltas, train_rows, cfg.train.batch_size, pad, device)
        ref_eval = reference_logps(model, deltas, eval_rows, cfg.train.batch_size, pad, device) if eval_rows else None

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]):
        pc, pr, rc, rr = pair_logps(model, deltas, batch, ref_train)
        out = dpo_loss(pc, pr, rc, rr, dpo.beta, dpo.loss, dpo.label_smoothing)
        metrics = {
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum(),
            "rewards/accuracies": pairwise_accuracy(out.chosen_rewards, out.rejected_rewards).sum(),
        }
        return out.losses.sum(), len(pc), metrics

    def eval_fn() -> dict[str, float]:
        batches = eval_batches(eval_rows, cfg.train.batch_size, pad, lambda rows, _epoch: collate_pairs(rows, pad))
        autocast = lambda: autocast_for(cfg.train, device)  # noqa: E731
        return dpo_metrics(model, batches, deltas, dpo.beta, dpo.loss, ref_eval, autocast)

    # --- held-out metrics of the base model, then train ---------------------------------------------
    base = None
    if eval_rows:
        with deltas.disabled():
            base = eval_fn()
        log(f"base model: held-out log-prob preference accuracy {base['logp_accuracy']:.3f}")
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
        log(
            f"after training: held-out preference accuracy {tuned['accuracy']:.3f} (implicit reward; base 0.5), "
            f"margin {tuned['margin']:.3f}, log-prob preference accuracy {tuned['logp_accuracy']:.3f} "
            f"(base {base['logp_accuracy']:.3f})"
        )

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
