"""Sequence classification (`stage: classify`): a new head on an encoder or a decoder, any delta.

Reads top to bottom: run directory -> labelled text (labels from the data or the config) -> model
with a new head (BERT: [CLS] -> pooler -> classifier; Llama: last real token -> score) + delta;
the head always trains (a `head` delta is added when the chosen deltas leave it frozen) -> train
with (optionally class-weighted) cross-entropy -> accuracy and macro-F1 on the eval split against
the majority-class baseline -> save adapter, labels.json, summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltatune.config import ClassifyConfig, RunConfig
from deltatune.data import BatchStream, eval_batches
from deltatune.data.classify import build_classify_data, collate_classify, pads_left
from deltatune.data.labels import LabelSet
from deltatune.errors import ConfigError
from deltatune.eval.metrics import classify_metrics, majority_baseline
from deltatune.models import load_tokenizer
from deltatune.objectives.classify import balanced_class_weights, count_labelled, sequence_classification_loss
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

__all__ = ["run", "eval_setup", "class_weights"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a classifier on `cfg.data` and return the run's summary."""
    # --- setup: run directory, seed, data and its labels -----------------------------------------
    run_dir = start_run(cfg, log)
    tokenizer = load_tokenizer(cfg.model)
    data = build_classify_data(cfg, tokenizer)
    log("\n".join(data.lines))
    data.labels.save(run_dir)

    # --- model with a new head + delta -----------------------------------------------------------
    device = resolve_device(cfg.train.device)
    model = load_base(cfg, "seq-cls", data.labels, tokenizer)
    deltas = attach_deltas(model, cfg, device, log, head=classifier_head)

    # --- train -----------------------------------------------------------------------------------
    weights = class_weights(cfg.classify, data.labels, [row.label for row in data.train])
    loss_fn = sequence_classification_loss(weights)
    collate = _collate_fn(model, tokenizer)
    stream = BatchStream(data.train, cfg.train.batch_size, tokenizer.pad_token_id, cfg.train.seed, collate_fn=collate)
    batches = lambda: eval_batches(data.eval, cfg.train.batch_size, tokenizer.pad_token_id, collate)  # noqa: E731
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

    # --- score against the majority-class baseline, save -----------------------------------------
    extra: dict[str, Any] = {"labels": list(data.labels.names)}
    if data.eval:
        metrics = classify_metrics(model, batches(), data.labels.names, weights)
        baseline = majority_baseline([r.label for r in data.train], [r.label for r in data.eval], data.labels.names)
        log(
            f"eval: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
            f"(majority class '{baseline['label']}': accuracy {baseline['accuracy']:.4f}, macro-F1 {baseline['macro_f1']:.4f})"
        )
        extra.update(eval_metrics=metrics, majority_baseline=baseline)
    return finish_run(cfg, run_dir, deltas, result, device, log, extra, tokenizer=tokenizer)


def class_weights(group: ClassifyConfig, labels: LabelSet, train_labels: list[int]) -> torch.Tensor | None:
    """The [K] loss weights that `classify.class_weights` asks for (None: unweighted)."""
    spec = group.class_weights
    if spec is None:
        return None
    if spec == "balanced":
        counts = Counter(train_labels)
        return torch.tensor(balanced_class_weights([counts.get(i, 0) for i in range(len(labels))]))
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(labels.names))
        if unknown:
            raise ConfigError(f"classify.class_weights: unknown label(s) {unknown}; the labels are {list(labels.names)}")
        return torch.tensor([float(spec.get(name, 1.0)) for name in labels.names])
    if len(spec) != len(labels):
        raise ConfigError(f"classify.class_weights has {len(spec)} weights for {len(labels)} labels {list(labels.names)}")
    return torch.tensor([float(w) for w in spec])


def _collate_fn(model: torch.nn.Module, tokenizer):
    return lambda rows, epoch: collate_classify(rows, tokenizer.pad_token_id, left=pads_left(model))


def eval_setup(cfg: RunConfig, run_dir: Path) -> EvalSetup:
    """The trained classifier and its eval batches (labels as in training), for `deltatune eval`."""
    tokenizer = load_tokenizer(cfg.model)
    labels = LabelSet.load(run_dir)
    data = build_classify_data(cfg, tokenizer, labels)
    model, deltas = load_trained(cfg, run_dir, "seq-cls", labels, tokenizer)
    weights = class_weights(cfg.classify, labels, [row.label for row in data.train])
    collate = _collate_fn(model, tokenizer)
    baseline = majority_baseline([r.label for r in data.train], [r.label for r in data.eval], labels.names)
    return EvalSetup(
        model,
        deltas,
        partial(eval_batches, data.eval, cfg.train.batch_size, tokenizer.pad_token_id, collate),
        context={"label_names": labels.names, "class_weights": weights},
        reference={"majority_baseline": baseline},
    )
