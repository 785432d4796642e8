"""Read data files into records, each remembering where it came from (for error messages).

Supported: .jsonl (one JSON object per line), .json (a list of objects, or an object holding one
list), .csv (header row), .parquet, .txt (documents separated by blank lines -> {"text": ...}).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DataError

__all__ = ["Record", "read_records", "SUFFIXES"]

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


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


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}


def read_records(path: str | Path) -> list[Record]:
    """All records of a data file; a DataError naming the file (and line) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUFFIXES)}")
    records = reader(path)
    if not records:
        raise DataError(f"{path}: no examples in this file")
    return records
