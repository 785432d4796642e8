"""Supervised fine-tuning (instruction / chat data), with any delta.

Reads top to bottom: run directory -> data -> model + delta -> train -> save adapter + summary.
The loss is next-token cross-entropy on assistant tokens (all tokens with
`data.train_on_inputs`), normalised per label token over each optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltatune.config import RunConfig
from deltatune.data import BatchStream, build_sft_data, eval_batches
from deltatune.models import load_model, load_tokenizer
from deltatune.objectives.clm import count_label_tokens, lm_loss
from deltatune.recipes.common import attach_deltas, finish_run, start_run
from deltatune.train.loop import autocast_for, evaluate, resolve_device, train

__all__ = ["run"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data` and return the run's summary."""
    # --- setup: run directory, seed, data (before the model: bad data fails fast) -------------
    run_dir = start_run(cfg, log)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, reports = build_sft_data(cfg.data, tokenizer, cfg.train.seed)
    for report in reports:
        log("\n".join(report.lines()))

    # --- model + delta ---------------------------------------------------------------------------
    device = resolve_device(cfg.train.device)
    model, _ = load_model(cfg.model, task="causal-lm")
    deltas = attach_deltas(model, cfg, device, log)

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

    # --- save ------------------------------------------------------------------------------------
    return finish_run(
        run_dir,
        cfg,
        deltas,
        tokenizer,
        device,
        {
            "steps": result.step,
            "final_loss": result.final_loss,
            "final_eval_loss": result.final_eval_loss,
            "train_tokens": result.train_tokens,
            "tokens_per_s": result.tokens_per_s,
            "wall_s": result.wall_s,
        },
        log,
    )
