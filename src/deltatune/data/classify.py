"""Data for sequence classification: `text` + `label` records -> token ids + class id -> batches.

Encoders (BERT and kin) read the sequence through their first token ([CLS]) and are padded on the
right. Decoder-only models classify from their last token (LlamaForSequenceClassification takes
the rightmost non-pad token), so their batches are padded on the *left*, with position ids
counted from each sequence's first real token: the last position then always holds the last real
token, also for deltas that prepend virtual tokens through `inputs_embeds`, where no pad id is seen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from deltatune.config import RunConfig
from deltatune.data.dataset import read_splits
from deltatune.data.labels import LabelSet
from deltatune.data.readers import Record, read_records
from deltatune.errors import DataError

__all__ = ["ClassifyRow", "ClassifyData", "build_classify_data", "encode_texts", "collate_classify", "pads_left"]


@dataclass(frozen=True)
class ClassifyRow:
    """One tokenized example and its class id (-1 when unlabelled, e.g. for prediction)."""

    input_ids: list[int]
    label: int
    source: str = ""


@dataclass
class ClassifyData:
    train: list[ClassifyRow]
    eval: list[ClassifyRow]
    labels: LabelSet
    lines: list[str]
    """What was read, for the log."""


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids of each text (with the model's special tokens), cut to `max_length`; and how many were cut."""
    ids = list(tokenizer(list(texts), add_special_tokens=True)["input_ids"])
    truncated = 0
    for i, seq in enumerate(ids):
        if len(seq) > max_length:
            truncated += 1
            ids[i] = list(tokenizer(texts[i], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
    return ids, truncated


def _rows(records: list[Record], labels: LabelSet, cfg: RunConfig, tokenizer, name: str) -> tuple[list[ClassifyRow], str]:
    group = cfg.classify
    texts = []
    for record in records:
        text = _required(record, group.text_field, "text_field")
        if not isinstance(text, str):
            raise DataError(f"{record.source}: field '{group.text_field}' must be a string, got {type(text).__name__}")
        texts.append(text)
    ids = [labels.index(_required(r, group.label_field, "label_field"), r.source) for r in records]
    tokens, truncated = encode_texts(tokenizer, texts, cfg.data.max_length)
    rows = [ClassifyRow(t, y, r.source) for t, y, r in zip(tokens, ids, records, strict=True)]
    counts = Counter(ids)
    per_label = ", ".join(f"{labels.names[i]} {counts.get(i, 0)}" for i in range(len(labels)))
    line = (
        f"{name}: {len(rows)} examples, {sum(len(t) for t in tokens):,} tokens, {truncated} truncated to "
        f"max_length={cfg.data.max_length}; labels: {per_label}"
    )
    return rows, line


def _required(record: Record, key: str, config_key: str) -> Any:
    value = record.fields.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        present = ", ".join(sorted(map(str, record.fields))[:12])
        raise DataError(
            f"{record.source}: field '{key}' is missing or empty (fields here: {present}); "
            f"set classify.{config_key} if another field holds it"
        )
    return value


def build_classify_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, labels: LabelSet | None = None) -> ClassifyData:
    """Read, split and tokenize the data of `cfg`; labels from `labels` (a trained run's), the config,
    or the training data."""
    train, evaluation = read_splits(cfg.data, read_records, cfg.train.seed)
    group = cfg.classify
    if labels is None:
        values = [_required(r, group.label_field, "label_field") for r in train]
        labels = LabelSet.from_data(values, "classify", group.label_names, group.num_labels)
    train_rows, train_line = _rows(train, labels, cfg, tokenizer, f"train ({cfg.data.train})")
    lines = [train_line]
    eval_rows: list[ClassifyRow] = []
    if evaluation:
        eval_rows, eval_line = _rows(evaluation, labels, cfg, tokenizer, f"eval ({cfg.data.eval or 'split'})")
        lines.append(eval_line)
    return ClassifyData(train_rows, eval_rows, labels, lines)


def pads_left(model: torch.nn.Module) -> bool:
    """Whether the model classifies from its last token (a decoder-only LM): pad such batches left."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(model.config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def collate_classify(rows: Sequence[ClassifyRow], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad rows into input_ids [B, T], attention_mask [B, T], labels [B] (and, padded left,
    position_ids [B, T] that start at 0 on each sequence's first real token)."""
    length = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        span = slice(length - n, length) if left else slice(0, n)
        input_ids[b, span] = torch.tensor(row.input_ids)
        mask[b, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([r.label for r in rows])}
    if left:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch
