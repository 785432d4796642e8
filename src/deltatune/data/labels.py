"""Label vocabularies for the classification stages: names <-> ids, with errors that name the example.

A label in the data may be a name (`positive`, `B-person`) or an id (`2`, also as the string "2"
that CSV files give). The vocabulary comes from the config (`label_names`) or from the training
data; an eval example whose label is not in it is an error naming the file and line, never a
silent new class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DataError

__all__ = ["LabelSet", "is_label_id", "bio_sort_key"]

LABELS_FILE = "labels.json"


def is_label_id(value: Any) -> bool:
    """Whether a label value is an id: a non-negative int, or a string of digits."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (isinstance(value, str) and value.strip().isdigit())


def bio_sort_key(tag: str) -> tuple[int, str, str]:
    """Order of BIO tags: `O` first, then by entity type, B- before I- (E-, S- after)."""
    if tag == "O":
        return (0, "", "")
    prefix, _, kind = tag.partition("-")
    return (1, kind or prefix, prefix)


@dataclass(frozen=True)
class LabelSet:
    """The labels of a task in id order."""

    names: tuple[str, ...]
    field: str = "label"
    """The config key the labels come from (named in error messages)."""

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise DataError(f"{self.field}: label names must be distinct, got {list(self.names)}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def index(self, value: Any, source: str) -> int:
        """The id of a label value (a name, or an id in range); a DataError naming `source` otherwise."""
        key = str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else None
        lookup = self.label2id
        if key is not None and key in lookup:
            return lookup[key]
        if is_label_id(value) and int(value) < len(self.names):
            return int(value)
        shown = ", ".join(self.names[:20]) + (" ..." if len(self.names) > 20 else "")
        raise DataError(
            f"{source}: unknown label {value!r}; the labels are: {shown}. "
            f"List every label in {self.field}.label_names (ids count from 0)."
        )

    @classmethod
    def from_data(
        cls,
        values: Iterable[Any],
        field: str,
        names: list[str] | None = None,
        num_labels: int | None = None,
        sort_key=None,
    ) -> LabelSet:
        """The label set for `values` (training labels): `names` when given; else `0..max` when every
        value is an id, else the distinct names sorted (by `sort_key`)."""
        if names is not None:
            return cls(tuple(names), field)
        values = list(values)
        if values and all(is_label_id(v) for v in values):
            count = max(int(v) for v in values) + 1
            if num_labels is not None:
                if num_labels < count:
                    raise DataError(f"{field}.num_labels={num_labels} but the data has label id {count - 1}")
                count = num_labels
            return cls(tuple(str(i) for i in range(count)), field)
        distinct = sorted({str(v).strip() for v in values}, key=sort_key)
        if num_labels is not None and num_labels != len(distinct):
            raise DataError(
                f"{field}.num_labels={num_labels} but the training data has {len(distinct)} labels "
                f"({', '.join(distinct[:20])}); give {field}.label_names to list them all"
            )
        if len(distinct) < 2:
            raise DataError(f"{field}: the training data has only the label(s) {distinct}; a classifier needs at least 2")
        return cls(tuple(distinct), field)

    # ---- stored with the run, so eval/predict use the training ids -----------------------------
    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / LABELS_FILE
        path.write_text(json.dumps({"field": self.field, "labels": list(self.names)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> LabelSet:
        path = Path(run_dir) / LABELS_FILE
        if not path.is_file():
            raise DataError(f"{run_dir}: {LABELS_FILE} is missing (is it a classify/tokens run that finished?)")
        data = json.loads(path.read_text())
        return cls(tuple(data["labels"]), data.get("field", "label"))
