"""Write the README's config reference from the config models' field docstrings.

    python scripts/config_reference.py          # rewrite the section in README.md
    python scripts/config_reference.py --check  # exit 1 if README.md is out of date (the tests run this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from deltatune.config import RunConfig
from deltatune.deltas.registry import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(group)"
    return f"`{json.dumps(value)}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{prefix}{name}.")
            continue
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_default(field)} | {doc} |")
    return rows


def reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|", *_rows(RunConfig, "")]
    for method, cls in METHODS.items():
        doc = " ".join((cls.__doc__ or "").split())
        lines += ["", f"**`delta.method: {method}`** — {doc}", "", "| key | default | meaning |", "|---|---|---|"]
        lines += [row for row in _rows(cls.config_class, "delta.") if not row.startswith("| `delta.method`")]
    return "\n".join(lines)


def render(readme: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference()}\n{END}{tail}"


if __name__ == "__main__":
    text = README.read_text()
    if "--check" in sys.argv:
        sys.exit(0 if render(text) == text else 1)
    README.write_text(render(text))
