"""Supervised fine-tuning (instruction / chat data), with any delta.

Reads top to bottom: run directory -> data -> model + delta -> train -> save adapter + summary.
The loss is next-token cross-entropy on assistant tokens (all tokens with
`data.train_on_inputs`), normalised per label token over each optimizer step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from deltatune.config import RunConfig, config_to_yaml
from deltatune.data import BatchStream, build_sft_data, eval_batches
from deltatune.deltas import attach
from deltatune.export.peft_format import save_deltas
from deltatune.inference import save_chat_template
from deltatune.models import load_model, load_tokenizer
from deltatune.objectives.clm import count_label_tokens, lm_loss
from deltatune.train.dist import is_main, world_size
from deltatune.train.logs import plot_losses
from deltatune.train.loop import autocast_for, evaluate, resolve_device, train
from deltatune.train.parallel import delta_weights
from deltatune.train.rundir import prepare_run_dir
from deltatune.train.summary import peak_memory_bytes, update_summary

__all__ = ["run"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data` and return the run's summary."""
    # --- setup: run directory, seed, data (before the model: bad data fails fast) -------------
    run_dir = prepare_run_dir(cfg)
    log(f"config (saved to {run_dir / 'config.yaml'}):\n{config_to_yaml(cfg)}")
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, reports = build_sft_data(cfg.data, tokenizer, cfg.train.seed)
    for report in reports:
        log("\n".join(report.lines()))

    # --- model + delta ---------------------------------------------------------------------------
    device = resolve_device(cfg.train.device)
    model, _ = load_model(cfg.model, task="causal-lm", quantize=cfg.quantize)
    deltas = attach(model, cfg.delta)
    model.to(device)
    trainable, total = deltas.num_trainable(), deltas.num_total()
    log(f"model {cfg.model}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.3f}%)")

    # --- train -----------------------------------------------------------------------------------
    stream = BatchStream(train_rows, cfg.train.batch_size, tokenizer.pad_token_id, seed=cfg.train.seed)

    def eval_fn() -> float:
        batches = eval_batches(eval_rows, cfg.train.batch_size, tokenizer.pad_token_id)
        return evaluate(model, batches, lm_loss, device, lambda: autocast_for(cfg.train, device))

    result = train(
        model,
        deltas,
        stream,
        lm_loss,
        lambda batch: count_label_tokens(batch["labels"]),
        cfg.train,
        run_dir,
        eval_fn=eval_fn if eval_rows else None,
        resume=cfg.resume,
        log=log,
    )

    # --- save (rank 0 writes; under FSDP every rank first joins in gathering the weights) --------
    weights = delta_weights(model, deltas)
    values = {
        "model": cfg.model,
        "stage": cfg.stage,
        "methods": [d.config.method for d in deltas],
        "trainable_params": trainable,
        "total_params": total,
        "steps": result.step,
        "final_loss": result.final_loss,
        "final_eval_loss": result.final_eval_loss,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_bytes": peak_memory_bytes(device),
        "wall_s": result.wall_s,
        "processes": world_size(),
    }
    if not is_main():
        return values
    adapter_dir = save_deltas(deltas, run_dir / "adapter", base_model=cfg.model, weights=weights)
    save_chat_template(tokenizer, adapter_dir)
    plot_losses(run_dir)
    summary = update_summary(run_dir, values)
    log(f"saved the adapter to {adapter_dir}; summary in {run_dir / 'summary.json'}")
    return summary
