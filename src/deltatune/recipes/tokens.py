"""Token classification (`stage: tokens`), e.g. named-entity recognition, with any delta.

Reads top to bottom: run directory -> tagged sentences (CoNLL/BIO or JSONL), each word's tag on its
first sub-word -> model with a new token head (+ delta; the head always trains) -> train with
per-token cross-entropy -> entity-level precision/recall/F1 (seqeval-style) on the eval split ->
save adapter, labels.json, summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltatune.config import RunConfig
from deltatune.data import BatchStream, Row, collate, eval_batches
from deltatune.data.labels import LabelSet
from deltatune.data.ner import TaggedRow, build_tokens_data
from deltatune.eval.metrics import tokens_metrics
from deltatune.models import load_tokenizer
from deltatune.objectives.classify import count_labelled, token_classification_loss
from deltatune.recipes.common import (
    EvalSetup,
    attach_deltas,
    classifier_head,
    eval_loss_fn,
    finish_run,
    load_base,
    load_trained,
    start_run,
)
from deltatune.train.loop import resolve_device, train

__all__ = ["run", "eval_setup", "collate_tagged"]


def collate_tagged(rows: Sequence[TaggedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tagged rows: input_ids, attention_mask, labels [B, T] (IGNORE on padding)."""
    return collate([Row(r.input_ids, r.labels) for r in rows], pad_id)


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a token tagger on `cfg.data` and return the run's summary."""
    # --- setup: run directory, seed, tagged data and its tag set --------------------------------
    run_dir = start_run(cfg, log)
    tokenizer = load_tokenizer(cfg.model)
    data = build_tokens_data(cfg, tokenizer)
    log("\n".join(data.lines))
    data.labels.save(run_dir)

    # --- model with a new token head + delta -----------------------------------------------------
    device = resolve_device(cfg.train.device)
    model = load_base(cfg, "token-cls", data.labels, tokenizer)
    deltas = attach_deltas(model, cfg, device, log, head=classifier_head)

    # --- train -----------------------------------------------------------------------------------
    loss_fn = token_classification_loss()
    collate_fn = lambda rows, epoch: collate_tagged(rows, tokenizer.pad_token_id)  # noqa: E731
    stream = BatchStream(data.train, cfg.train.batch_size, tokenizer.pad_token_id, cfg.train.seed, collate_fn=collate_fn)
    batches = lambda: eval_batches(data.eval, cfg.train.batch_size, tokenizer.pad_token_id, collate_fn)  # noqa: E731
    result = train(
        model,
        deltas,
        stream,
        loss_fn,
        lambda batch: count_labelled(batch["labels"]),
        cfg.train,
        run_dir,
        eval_fn=eval_loss_fn(model, batches, loss_fn, cfg, device) if data.eval else None,
        resume=cfg.resume,
        log=log,
    )

    # --- entity scores, save ---------------------------------------------------------------------
    extra: dict[str, Any] = {"labels": list(data.labels.names)}
    if data.eval:
        metrics = tokens_metrics(model, batches(), data.labels.names)
        log(
            f"eval: entity precision {metrics['precision']:.4f}, recall {metrics['recall']:.4f}, "
            f"F1 {metrics['f1']:.4f} over {metrics['entities']} entities"
        )
        extra["eval_metrics"] = metrics
    return finish_run(cfg, run_dir, deltas, result, device, log, extra, tokenizer=tokenizer)


def eval_setup(cfg: RunConfig, run_dir: Path) -> EvalSetup:
    """The trained tagger and its eval batches (tags as in training), for `deltatune eval`."""
    tokenizer = load_tokenizer(cfg.model)
    labels = LabelSet.load(run_dir)
    data = build_tokens_data(cfg, tokenizer, labels)
    model, deltas = load_trained(cfg, run_dir, "token-cls", labels, tokenizer)
    collate_fn = lambda rows, epoch: collate_tagged(rows, tokenizer.pad_token_id)  # noqa: E731
    return EvalSetup(
        model,
        deltas,
        partial(eval_batches, data.eval, cfg.train.batch_size, tokenizer.pad_token_id, collate_fn),
        context={"label_names": labels.names},
    )
