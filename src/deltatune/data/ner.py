"""Data for token classification (NER): tagged words -> sub-word tokens with aligned labels.

Sentences come from CoNLL/BIO text files (`token<TAB>tag` lines, a blank line between
sentences; see `read_conll`) or from JSONL/JSON/parquet records with a list of words and a list of
tags. Words are joined with spaces and tokenized once; a word's tag goes to its *first* sub-word
token and every other token (later sub-words, [CLS]/[SEP]) gets IGNORE, as in BERT's NER setup
(Devlin et al. 2019, sec. 5.3). The character offsets of the fast tokenizer do the alignment,
so any fast tokenizer works (WordPiece, BPE with leading-space tokens, SentencePiece).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from deltatune.config import RunConfig, TokensConfig
from deltatune.data.dataset import read_splits
from deltatune.data.labels import LabelSet, bio_sort_key
from deltatune.data.readers import Record, read_conll, read_records, resolve_data_path
from deltatune.data.tokenize import IGNORE
from deltatune.errors import DataError

__all__ = ["TaggedRow", "TokensData", "read_tagged", "align_labels", "build_tokens_data", "complete_bio", "RECORD_SUFFIXES"]

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
"""Files read as records with word and tag lists; any other file is read as CoNLL/BIO text."""


@dataclass(frozen=True)
class TaggedRow:
    """One sentence: token ids, a label per token (IGNORE off first sub-words), and its words."""

    input_ids: list[int]
    labels: list[int]
    source: str
    words: tuple[str, ...] = ()
    """The words whose first sub-word carries a label, in order (for printing predictions)."""


@dataclass
class TokensData:
    train: list[TaggedRow]
    eval: list[TaggedRow]
    labels: LabelSet
    lines: list[str]


def read_tagged(path: str, group: TokensConfig) -> list[Record]:
    """Sentences of a data file as records {"tokens": [...], "tags": [...]}, checked."""
    if resolve_data_path(path).suffix.lower() not in RECORD_SUFFIXES:
        return read_conll(path)
    out = []
    for record in read_records(path):
        words, tags = record.fields.get(group.tokens_field), record.fields.get(group.tags_field)
        for key, value, setting in ((group.tokens_field, words, "tokens_field"), (group.tags_field, tags, "tags_field")):
            if not isinstance(value, list) or not value:
                raise DataError(
                    f"{record.source}: field '{key}' must be a non-empty list (fields here: "
                    f"{', '.join(sorted(map(str, record.fields))[:12])}); set tokens.{setting} if another field holds it"
                )
        if len(words) != len(tags):
            raise DataError(f"{record.source}: {len(words)} tokens but {len(tags)} tags; give one tag per token")
        if not all(isinstance(w, str) and w for w in words):
            raise DataError(f"{record.source}: field '{group.tokens_field}' must hold non-empty strings")
        out.append(Record({"tokens": words, "tags": tags}, record.source))
    return out


def align_labels(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str], tag_ids: Sequence[int], max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, word indices kept): `labels[t]` is the tag of the word whose first sub-word
    is token t, else IGNORE. Words cut off by `max_length` or with no token get no label."""
    spans, start = [], 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    encoding = tokenizer(
        " ".join(words), add_special_tokens=True, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    labels, kept, w = [], [], 0
    for lo, hi in encoding["offset_mapping"]:
        while w < len(spans) and spans[w][1] <= lo:
            w += 1
        first = hi > lo and w < len(spans) and spans[w][0] < hi and (not kept or kept[-1] != w)
        labels.append(tag_ids[w] if first else IGNORE)
        if first:
            kept.append(w)
    return list(encoding["input_ids"]), labels, kept


def complete_bio(tags: Sequence[object]) -> list[object]:
    """`tags` plus the B-/I- partner of every B-/I- tag, so an entity type seen in training only as
    single words (B- without I-) still has its I- tag when longer entities of it appear later."""
    partners = []
    for tag in set(map(str, tags)):
        prefix, sep, kind = tag.partition("-")
        if sep and prefix in ("B", "I"):
            partners += [f"B-{kind}", f"I-{kind}"]
    return [*tags, *partners]


def _rows(records: list[Record], labels: LabelSet, tokenizer, max_length: int, name: str) -> tuple[list[TaggedRow], str]:
    rows, words_total, dropped, entities = [], 0, 0, Counter()
    for record in records:
        words, tags = record.fields["tokens"], record.fields["tags"]
        tag_ids = [labels.index(tag, record.source) for tag in tags]
        ids, token_labels, kept = align_labels(tokenizer, words, tag_ids, max_length)
        rows.append(TaggedRow(ids, token_labels, record.source, tuple(words[i] for i in kept)))
        words_total += len(words)
        dropped += len(words) - len(kept)
        entities.update(str(t)[2:] for t in tags if str(t).startswith(("B-", "S-")))
    shown = ", ".join(f"{kind} {n}" for kind, n in entities.most_common())
    line = (
        f"{name}: {len(rows)} sentences, {words_total:,} words, {sum(len(r.input_ids) for r in rows):,} tokens; "
        f"{dropped} words left out (cut by max_length={max_length} or no token); entities: {shown or 'none'}"
    )
    return rows, line


def build_tokens_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, labels: LabelSet | None = None) -> TokensData:
    """Read, split, tag-check and align the data of `cfg`; tags from `labels`, the config or the training data."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"stage tokens needs a fast tokenizer (character offsets); {cfg.model} has a slow one")
    train, evaluation = read_splits(cfg.data, lambda path: read_tagged(path, cfg.tokens), cfg.train.seed)
    if labels is None:
        tags = [tag for record in train for tag in record.fields["tags"]]
        labels = LabelSet.from_data(complete_bio(tags), "tokens", cfg.tokens.label_names, sort_key=bio_sort_key)
    train_rows, line = _rows(train, labels, tokenizer, cfg.data.max_length, f"train ({cfg.data.train})")
    lines, eval_rows = [line], []
    if evaluation:
        eval_rows, line = _rows(evaluation, labels, tokenizer, cfg.data.max_length, f"eval ({cfg.data.eval or 'split'})")
        lines.append(line)
    return TokensData(train_rows, eval_rows, labels, lines)
