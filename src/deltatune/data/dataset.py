"""From data files to training rows: read -> normalise -> tokenize + mask -> check -> pack.

The check refuses a data set in which no example has a token to learn from (the usual cause of a
loss of 0 or NaN with completion-only masking) and reports how many examples were dropped and why.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from deltatune.config import DataConfig
from deltatune.data.collate import Row, as_rows, pack
from deltatune.data.formats import Example, to_example
from deltatune.data.readers import read_records
from deltatune.data.tokenize import Tokenized, tokenize_conversation, tokenize_text
from deltatune.errors import DataError

__all__ = ["DataReport", "load_examples", "tokenize_examples", "read_splits", "build_sft_data"]

T = TypeVar("T")


@dataclass
class DataReport:
    """What happened to a data set on its way to training rows."""

    name: str
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    label_tokens: int = 0
    tokens: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> sources of the examples dropped for it."""

    def lines(self) -> list[str]:
        out = [
            f"{self.name}: {self.kept}/{self.examples} examples, {self.tokens:,} tokens "
            f"({self.label_tokens:,} trained on), {self.truncated} truncated"
        ]
        for reason, sources in self.dropped.items():
            shown = ", ".join(sources[:3]) + (" ..." if len(sources) > 3 else "")
            out.append(f"  dropped {len(sources)}: {reason} (e.g. {shown})")
        return out


def load_examples(path: str, fmt: str = "auto", system: str | None = None) -> list[Example]:
    """Read and normalise every record of a data file."""
    return [to_example(record, fmt, system) for record in read_records(path)]


def tokenize_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, name: str
) -> tuple[list[Tokenized], DataReport]:
    """Tokenize and mask examples; drop (and report) those with no token to learn from."""
    report = DataReport(name, examples=len(examples))
    kept = []
    for ex in examples:
        if ex.messages is not None:
            tok = tokenize_conversation(tokenizer, ex.messages, cfg.max_length, cfg.train_on_inputs, ex.source)
        else:
            tok = tokenize_text(tokenizer, ex.text or "", cfg.max_length, ex.source)
        report.truncated += tok.truncated
        if tok.num_label_tokens == 0:
            reason = (
                f"no trainable token left after truncation to max_length={cfg.max_length}"
                if tok.truncated
                else "no trainable token (empty reply?)"
            )
            report.dropped.setdefault(reason, []).append(ex.source)
            continue
        kept.append(tok)
        report.tokens += len(tok.input_ids)
        report.label_tokens += tok.num_label_tokens
    report.kept = len(kept)
    if not kept:
        raise DataError(
            f"{name}: none of the {len(examples)} examples has a token to train on.\n  "
            + "\n  ".join(report.lines()[1:])
            + "\n  Raise data.max_length, or set data.train_on_inputs: true to learn from prompts too."
        )
    return kept, report


def _rows(examples: Sequence[Tokenized], cfg: DataConfig) -> list[Row]:
    return pack(examples, cfg.max_length) if cfg.packing else as_rows(examples)


def _subsample(items: list[T], max_samples: int | None, seed: int) -> list[T]:
    if max_samples is None or len(items) <= max_samples:
        return items
    picked = sorted(random.Random(seed).sample(range(len(items)), max_samples))
    return [items[i] for i in picked]


def read_splits(cfg: DataConfig, read: Callable[[str], list[T]], seed: int = 0) -> tuple[list[T], list[T]]:
    """Training and eval items (eval possibly empty): each file read with `read` and cut to
    `cfg.max_samples`; without `cfg.eval`, a seeded `cfg.eval_split` of the training items is held out."""
    if not cfg.train:
        raise DataError("data.train is not set: give the path of a training data file")
    train = _subsample(read(cfg.train), cfg.max_samples, seed)
    if cfg.eval:
        return train, _subsample(read(cfg.eval), cfg.max_samples, seed)
    if cfg.eval_split <= 0:
        return train, []
    shuffled = list(train)
    random.Random(seed).shuffle(shuffled)
    cut = max(1, round(len(shuffled) * cfg.eval_split))
    if cut >= len(shuffled):
        raise DataError(f"{cfg.train}: data.eval_split={cfg.eval_split} leaves no training examples")
    return shuffled[cut:], shuffled[:cut]


def build_sft_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> tuple[list[Row], list[Row], list[DataReport]]:
    """Training rows, eval rows (possibly empty) and a report per split."""
    train, evaluation = read_splits(cfg, lambda path: load_examples(path, cfg.format, cfg.system), seed)
    train_tok, train_report = tokenize_examples(train, tokenizer, cfg, f"train ({cfg.train})")
    reports = [train_report]
    eval_rows: list[Row] = []
    if evaluation:
        eval_tok, eval_report = tokenize_examples(evaluation, tokenizer, cfg, f"eval ({cfg.eval or 'split'})")
        reports.append(eval_report)
        eval_rows = _rows(eval_tok, cfg)
    return _rows(train_tok, cfg), eval_rows, reports
