"""Read data files into records, each remembering where it came from (for error messages).

Supported: .jsonl (one JSON object per line), .json (a list of objects, or an object holding one
list), .csv (header row), .parquet, .txt (documents separated by blank lines -> {"text": ...}),
and CoNLL/BIO token files (.conll .bio .iob; `read_conll` also reads them under other names):
one `token<TAB or spaces>tag` per line, a blank line between sentences -> {"tokens", "tags"}.

A path `pkg:NAME/inner/path` names a file inside an installed Python package (found with
`importlib.util.find_spec`, never imported), so example configs can use the packaged data sets.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DataError

__all__ = ["Record", "read_records", "read_conll", "resolve_data_path", "SUFFIXES", "CONLL_SUFFIXES"]

CONLL_SUFFIXES = (".conll", ".bio", ".iob")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", *CONLL_SUFFIXES)


@dataclass(frozen=True)
class Record:
    """One example as read from disk."""

    fields: dict[str, Any]
    source: str
    """Where it came from: `file:line` (jsonl, csv, txt) or `file[index]` (json, parquet)."""


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            records.append(Record(value, f"{path}:{number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of examples (or an object holding exactly one list)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of examples, got {type(value).__name__}")
    records = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}[{index}]: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, f"{path}[{index}]"))
    return records


def _read_csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        # the header is line 1; a row's line is where it starts (quoted fields may span lines)
        return [Record(dict(row), f"{path}:{reader.line_num}") for row in reader]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [Record(row, f"{path}[{index}]") for index, row in enumerate(rows)]


def _read_txt(path: Path) -> list[Record]:
    records, block, start = [], [], 1
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            records.append(Record({"text": "\n".join(block)}, f"{path}:{start}"))
            block = []
    return records


def read_conll(path: str | Path) -> list[Record]:
    """Sentences of a CoNLL/BIO file as records {"tokens": [...], "tags": [...]}.

    Each line is `token<TAB>tag` (tab-separated columns, else whitespace-separated); with more
    columns (CoNLL-2003: token POS chunk tag) the first is the token and the last the tag. A blank
    (or whitespace-only) line ends a sentence; `-DOCSTART-` lines are skipped. A record's source is
    the line of its first token.
    """
    path = resolve_data_path(path)
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        if not line.strip():
            if tokens:
                records.append(Record({"tokens": tokens, "tags": tags}, f"{path}:{start}"))
                tokens, tags = [], []
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        columns = [c.strip() for c in columns]
        if columns[0].startswith("-DOCSTART-"):
            continue
        if len(columns) < 2 or not columns[0] or not columns[-1]:
            raise DataError(
                f"{path}:{number}: expected 'token<TAB>tag' (a blank line between sentences), got {line!r}"
            )
        if not tokens:
            start = number
        tokens.append(columns[0])
        tags.append(columns[-1])
    if not records:
        raise DataError(f"{path}: no sentences in this file")
    return records


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
    **dict.fromkeys(CONLL_SUFFIXES, read_conll),
}


def resolve_data_path(path: str | Path) -> Path:
    """The file a data path names: `pkg:NAME/inner/path` is resolved inside installed package NAME."""
    text = str(path)
    if not text.startswith("pkg:"):
        return Path(path)
    package, _, inner = text[4:].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or spec.origin is None:
        raise DataError(f"data path {text}: package '{package}' is not installed (e.g. `make install` installs the data packages)")
    return Path(spec.origin).parent / inner


def read_records(path: str | Path) -> list[Record]:
    """All records of a data file; a DataError naming the file (and line) when it cannot be read."""
    path = resolve_data_path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")
    records = reader(path)
    if not records:
        raise DataError(f"{path}: no examples in this file")
    return records
