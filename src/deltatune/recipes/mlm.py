"""Masked-LM training for encoders (`stage: mlm`): continued BERT-style pretraining on raw text.

Reads top to bottom: run directory -> raw text rows -> masked-LM model + delta (the MLM head
trains too: sentence-encoder checkpoints such as MiniLM ship without one) -> train on batches
masked per (seed, epoch, example) -> save the adapter, and the adapted encoder as a plain model
directory (`OUTPUT_DIR/model/`) that a `classify` or `tokens` run can start from:

    model: runs/mlm-tweets/model
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.config import RunConfig
from deltatune.data import BatchStream, eval_batches
from deltatune.data.text import MlmCollator, build_mlm_data
from deltatune.eval.metrics import mlm_metrics
from deltatune.export.merged import save_merged_backbone
from deltatune.models import load_tokenizer
from deltatune.objectives.mlm import count_masked, mlm_loss
from deltatune.recipes.common import (
    EvalSetup,
    attach_deltas,
    eval_loss_fn,
    finish_run,
    load_base,
    load_trained,
    mlm_head,
    start_run,
)
from deltatune.train.loop import resolve_device, train

__all__ = ["run", "eval_setup"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `cfg.model` as a masked LM on the raw text of `cfg.data`; return the run's summary."""
    # --- setup: run directory, seed, data -------------------------------------------------------
    run_dir = start_run(cfg, log)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, lines = build_mlm_data(cfg, tokenizer)
    log("\n".join(lines))

    # --- model + delta (+ the MLM head) ----------------------------------------------------------
    device = resolve_device(cfg.train.device)
    model = load_base(cfg, task="masked-lm")
    deltas = attach_deltas(model, cfg, device, log, head=mlm_head)

    # --- train: every example masked afresh each epoch, reproducibly ------------------------------
    collator = MlmCollator(tokenizer, cfg.mlm, cfg.train.seed)
    stream = BatchStream(train_rows, cfg.train.batch_size, tokenizer.pad_token_id, cfg.train.seed, collate_fn=collator)
    batches = lambda: eval_batches(eval_rows, cfg.train.batch_size, tokenizer.pad_token_id, collator)  # noqa: E731
    result = train(
        model,
        deltas,
        stream,
        mlm_loss,
        lambda batch: count_masked(batch["labels"]),
        cfg.train,
        run_dir,
        eval_fn=eval_loss_fn(model, batches, mlm_loss, cfg, device) if eval_rows else None,
        resume=cfg.resume,
        log=log,
    )

    # --- save: adapter, and the adapted encoder for the next stage --------------------------------
    metrics = mlm_metrics(model, batches()) if eval_rows else None
    if metrics:
        log(f"held-out masked-token loss {metrics['loss']:.4f} (pseudo-perplexity {metrics['perplexity']:.2f})")
    extra: dict[str, Any] = {"eval_metrics": metrics}
    if cfg.mlm.export_model:
        extra["exported_model"] = str(save_merged_backbone(model, deltas, cfg.model, tokenizer, run_dir / "model"))
        log(f"adapted encoder written to {extra['exported_model']} (use it as `model:` of a classify/tokens run)")
    return finish_run(cfg, run_dir, deltas, result, device, log, extra, tokenizer=tokenizer)


def eval_setup(cfg: RunConfig, run_dir: Path) -> EvalSetup:
    """The trained run's model and its fixed-mask eval batches, for `deltatune eval`."""
    tokenizer = load_tokenizer(cfg.model)
    _, eval_rows, _ = build_mlm_data(cfg, tokenizer)
    model, deltas = load_trained(cfg, run_dir, task="masked-lm")
    collator = MlmCollator(tokenizer, cfg.mlm, cfg.train.seed)
    return EvalSetup(model, deltas, lambda: eval_batches(eval_rows, cfg.train.batch_size, tokenizer.pad_token_id, collator))
