"""Continued pretraining (`stage: pt`): causal LM on raw text, packed into full rows, with any delta.

Reads top to bottom: run directory -> raw text, split into chunks and packed -> model + delta ->
train -> save + summary (with held-out perplexity). Every token is a label (except each chunk's
first), so this is the unsupervised fine-tuning of the seeds: adapting a model to a domain's text.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.config import RunConfig
from deltatune.data import eval_batches
from deltatune.data.text import build_pt_data
from deltatune.eval.metrics import lm_metrics
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
    """Continue pretraining `cfg.model` on the raw text of `cfg.data`; return the run's summary."""
    # --- setup: run directory, seed, data -------------------------------------------------------
    run_dir = start_run(cfg, log)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, lines = build_pt_data(cfg, tokenizer)
    log("\n".join(lines))

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
    metrics = lm_metrics(model, batches()) if eval_rows else None
    if metrics:
        log(f"held-out perplexity {metrics['perplexity']:.3f} (loss {metrics['loss']:.4f})")
    return finish_run(cfg, run_dir, deltas, result, device, log, {"eval_metrics": metrics}, chat_tokenizer=tokenizer)


def eval_setup(cfg: RunConfig, run_dir: Path) -> EvalSetup:
    """The trained run's model and packed eval rows, for `deltatune eval`."""
    tokenizer = load_tokenizer(cfg.model)
    _, eval_rows, _ = build_pt_data(cfg, tokenizer)
    model, deltas = load_trained(cfg, run_dir, task="causal-lm")
    return EvalSetup(model, deltas, lambda: eval_batches(eval_rows, cfg.train.batch_size, tokenizer.pad_token_id))
