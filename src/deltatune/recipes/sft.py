"""Supervised fine-tuning (instruction / chat data), with any delta.

Reads top to bottom: run directory -> data -> model + delta -> train -> save adapter + summary.
The loss is next-token cross-entropy on assistant tokens (all tokens with
`data.train_on_inputs`), normalised per label token over each optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.config import RunConfig
from deltatune.data import build_sft_data, eval_batches
from deltatune.models import load_tokenizer
from deltatune.objectives.clm import count_label_tokens, lm_loss
from deltatune.recipes.common import (
    EvalSetup,
    attach_deltas,
    eval_loss_fn,
    finish_run,
    lm_train_stream,
    load_base,
    load_trained,
    start_run,
)
from deltatune.train.loop import resolve_device, train

__all__ = ["run", "eval_setup"]


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
    model = load_base(cfg, task="causal-lm")
    deltas = attach_deltas(model, cfg, device, log)

    # --- train -----------------------------------------------------------------------------------
    stream = lm_train_stream(cfg, train_rows, tokenizer.pad_token_id, model)
    batches = lambda: eval_batches(eval_rows, cfg.train.batch_size, tokenizer.pad_token_id)  # noqa: E731
    result = train(
        model,
        deltas,
        stream,
        lm_loss,
        lambda batch: count_label_tokens(batch["labels"]),
        cfg.train,
        run_dir,
        eval_fn=eval_loss_fn(model, batches, lm_loss, cfg, device) if eval_rows else None,
        resume=cfg.resume,
        log=log,
    )

    # --- save ------------------------------------------------------------------------------------
    return finish_run(cfg, run_dir, deltas, result, device, log, chat_tokenizer=tokenizer)


def eval_setup(cfg: RunConfig, run_dir: Path) -> EvalSetup:
    """The trained run's model and eval batches, for `deltatune eval`."""
    tokenizer = load_tokenizer(cfg.model)
    _, eval_rows, _ = build_sft_data(cfg.data, tokenizer, cfg.train.seed)
    model, deltas = load_trained(cfg, run_dir, task="causal-lm")
    return EvalSetup(model, deltas, lambda: eval_batches(eval_rows, cfg.train.batch_size, tokenizer.pad_token_id))
