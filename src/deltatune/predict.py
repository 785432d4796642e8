"""Predictions of a trained classification run: a label per text (`classify`), a tag per word (`tokens`).

    run = load_run("runs/sentiment")
    classify_texts(run, ["what a great day"])  # [{"label": "positive", "probabilities": {...}}]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltatune.config import RunConfig
from deltatune.data.classify import ClassifyRow, collate_classify, encode_texts, pads_left
from deltatune.data.labels import LabelSet
from deltatune.data.ner import TaggedRow, align_labels
from deltatune.data.tokenize import IGNORE
from deltatune.errors import UserError
from deltatune.eval.metrics import batches_on
from deltatune.eval.scores import get_entities
from deltatune.models import load_tokenizer
from deltatune.recipes.tokens import collate_tagged

__all__ = ["LoadedRun", "load_run", "classify_texts", "tag_sentences"]

_TASKS = {"classify": "seq-cls", "tokens": "token-cls"}


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    labels: LabelSet


def load_run(run_dir: str | Path) -> LoadedRun:
    """A finished `classify` or `tokens` run, ready to predict (deltas merged where they can be)."""
    from deltatune.eval.report import resolve_run
    from deltatune.recipes.common import load_trained

    cfg, run_dir = resolve_run(run_dir)
    if cfg.stage not in _TASKS:
        raise UserError(f"{run_dir} is a '{cfg.stage}' run; predict needs a classify or tokens run (use generate for LMs)")
    tokenizer = load_tokenizer(cfg.model)
    labels = LabelSet.load(run_dir)
    model, deltas = load_trained(cfg, run_dir, _TASKS[cfg.stage], labels, tokenizer)
    if all(d.mergeable for d in deltas):
        deltas.merge()
    return LoadedRun(cfg, model, tokenizer, labels)


@torch.no_grad()
def classify_texts(run: LoadedRun, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """The most likely label of each text and the probability of every label."""
    out = []
    left = pads_left(run.model)
    for start in range(0, len(texts), batch_size):
        ids, _ = encode_texts(run.tokenizer, texts[start : start + batch_size], run.cfg.data.max_length)
        batch = collate_classify([ClassifyRow(i, -1) for i in ids], run.tokenizer.pad_token_id, left)
        (batch,) = batches_on(run.model, [batch])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        probs = run.model(**inputs).logits.float().softmax(-1).cpu()
        for row in probs:
            out.append(
                {
                    "label": run.labels.names[int(row.argmax())],
                    "probabilities": {name: round(float(p), 6) for name, p in zip(run.labels.names, row, strict=True)},
                }
            )
    return out


@torch.no_grad()
def tag_sentences(run: LoadedRun, sentences: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """A tag for every word of each sentence (words past max_length get `O`) and the entities found."""
    out = []
    for words in sentences:
        ids, labels, kept = align_labels(run.tokenizer, words, [0] * len(words), run.cfg.data.max_length)
        (batch,) = batches_on(run.model, [collate_tagged([TaggedRow(ids, labels, "")], run.tokenizer.pad_token_id)])
        logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        first = (batch["labels"][0] != IGNORE).nonzero().flatten()
        tags = ["O"] * len(words)
        for word, position in zip(kept, first.tolist(), strict=True):
            tags[word] = run.labels.names[int(logits[position].argmax())]
        entities = [
            {"type": kind, "text": " ".join(words[a : b + 1]), "start": a, "end": b + 1} for kind, a, b in get_entities(tags)
        ]
        out.append({"words": list(words), "tags": tags, "entities": entities})
    return out
