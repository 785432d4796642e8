"""Raw-text data for the pretraining stages: `pt` (causal LM, packed rows) and `mlm` (masked LM).

Documents longer than `data.max_length` are split into consecutive chunks rather than truncated,
so no text is thrown away. For `pt` the chunks are packed into full rows (positions restart per
chunk, so nothing attends across documents). For `mlm` each chunk is one row with the model's
special tokens ([CLS] ... [SEP]) and the masking happens at collation, deterministically per
(seed, epoch, example) so that a resumed run sees exactly the masks of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from deltatune.config import MlmConfig, RunConfig
from deltatune.data.collate import Row, as_rows, collate, pack
from deltatune.data.dataset import load_examples, read_splits
from deltatune.data.tokenize import IGNORE, Tokenized
from deltatune.errors import DataError
from deltatune.objectives.mlm import mask_tokens

__all__ = ["read_texts", "chunk_document", "build_pt_data", "TextRow", "build_mlm_data", "MlmCollator", "example_seed"]


def read_texts(path: str, fmt: str) -> list[tuple[str, str]]:
    """(text, source) of every record of a raw-text file (`.txt` documents, or records with `text`)."""
    if fmt not in ("auto", "text"):
        raise DataError(f"data.format={fmt}: the pretraining stages read raw text; use data.format: text")
    return [(ex.text or "", ex.source) for ex in load_examples(path, "text")]


def chunk_document(ids: Sequence[int], max_length: int, source: str) -> list[Tokenized]:
    """Split one document's token ids into pieces of at most `max_length`; every token is a label
    except each piece's first (nothing before it in the row predicts it)."""
    pieces = []
    for start in range(0, len(ids), max_length):
        piece = list(ids[start : start + max_length])
        pieces.append(Tokenized(piece, [IGNORE, *piece[1:]], source, truncated=False))
    return pieces


def _tokenize_docs(tokenizer, docs: list[tuple[str, str]], max_length: int) -> list[Tokenized]:
    encoded = tokenizer([text for text, _ in docs], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out: list[Tokenized] = []
    for ids, (_, source) in zip(encoded, docs, strict=True):
        ids = list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
        out += [piece for piece in chunk_document(ids, max_length, source) if len(piece.input_ids) > 1]
    return out


def _line(name: str, docs: int, rows: Sequence[Row], max_length: int) -> str:
    tokens = sum(len(r.input_ids) for r in rows)
    fill = tokens / max(1, len(rows) * max_length)
    return f"{name}: {docs} documents, {tokens:,} tokens in {len(rows)} rows of up to {max_length} ({fill:.0%} full)"


def build_pt_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[list[Row], list[Row], list[str]]:
    """Training rows, eval rows and log lines for continued pretraining (packed unless
    `data.packing: false` is set explicitly)."""
    packing = cfg.data.packing or "packing" not in cfg.data.model_fields_set
    train, evaluation = read_splits(cfg.data, lambda path: read_texts(path, cfg.data.format), cfg.train.seed)
    out, lines = [], []
    for name, docs in ((f"train ({cfg.data.train})", train), (f"eval ({cfg.data.eval or 'split'})", evaluation)):
        pieces = _tokenize_docs(tokenizer, docs, cfg.data.max_length) if docs else []
        if docs and not pieces:
            raise DataError(f"{name}: no document has two or more tokens to learn from")
        rows = pack(pieces, cfg.data.max_length) if packing else as_rows(pieces)
        out.append(rows)
        if docs:
            lines.append(_line(name, len(docs), rows, cfg.data.max_length))
    return out[0], out[1], lines


@dataclass(frozen=True)
class TextRow:
    """One MLM row: token ids with special tokens, which of them are special, and the example's index
    (the masking seed)."""

    input_ids: list[int]
    special: list[bool]
    index: int


def _mlm_rows(tokenizer, docs: list[tuple[str, str]], max_length: int, offset: int) -> list[TextRow]:
    encoding = tokenizer(
        [text for text, _ in docs],
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        return_overflowing_tokens=True,
        return_special_tokens_mask=True,
    )
    rows = []
    for ids, special in zip(encoding["input_ids"], encoding["special_tokens_mask"], strict=True):
        if sum(1 for s in special if not s) == 0:
            continue
        rows.append(TextRow(list(ids), [bool(s) for s in special], offset + len(rows)))
    return rows


def build_mlm_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[list[TextRow], list[TextRow], list[str]]:
    """Training rows, eval rows and log lines for masked-LM training (long documents are split into
    several rows, each with the special tokens)."""
    if tokenizer.mask_token_id is None:
        raise DataError(f"stage mlm needs a tokenizer with a mask token; {cfg.model}'s has none (is it an encoder?)")
    if cfg.data.packing:
        raise DataError("data.packing is not supported for stage mlm (encoders attend across packed documents)")
    train, evaluation = read_splits(cfg.data, lambda path: read_texts(path, cfg.data.format), cfg.train.seed)
    train_rows = _mlm_rows(tokenizer, train, cfg.data.max_length, 0)
    eval_rows = _mlm_rows(tokenizer, evaluation, cfg.data.max_length, 0) if evaluation else []
    lines = [
        f"{name}: {len(docs)} documents -> {len(rows)} rows, {sum(len(r.input_ids) for r in rows):,} tokens"
        for name, docs, rows in (("train", train, train_rows), ("eval", evaluation, eval_rows))
        if docs
    ]
    return train_rows, eval_rows, lines


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The masking seed of one example in one epoch (a fixed mixing of the three numbers)."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 17) % (2**63 - 1)


class MlmCollator:
    """`collate_fn` for BatchStream: masks each row with its own (seed, epoch, index) generator,
    then pads. The result does not depend on the batch size, the rank count or resumption."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, group: MlmConfig, seed: int) -> None:
        self.mask_id, self.pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
        self.vocab_size, self.group, self.seed = len(tokenizer), group, seed

    def __call__(self, rows: Sequence[TextRow], epoch: int) -> dict[str, torch.Tensor]:
        masked = []
        for row in rows:
            generator = torch.Generator().manual_seed(example_seed(self.seed, epoch, row.index))
            inputs, labels = mask_tokens(
                torch.tensor(row.input_ids),
                torch.tensor(row.special),
                self.mask_id,
                self.vocab_size,
                generator,
                self.group.probability,
                self.group.mask_fraction,
                self.group.random_fraction,
            )
            masked.append(Row(inputs.tolist(), labels.tolist()))
        return collate(masked, self.pad_id)
