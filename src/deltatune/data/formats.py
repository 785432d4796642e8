"""Normalise records of the supported formats into conversations or raw text.

- `messages`: `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI), or ShareGPT's
  `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`; also
  `{"prompt": ..., "completion": ...}` as one user/assistant exchange.
- `alpaca`: `{"instruction", "input" (optional), "output", "system" (optional)}`.
- `text`: `{"text": ...}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.data.readers import Record
from deltatune.errors import DataError

__all__ = ["Example", "detect_format", "to_example", "FORMATS"]

FORMATS = ("messages", "alpaca", "text")

_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Example:
    """A normalised example: a conversation (`messages`) or a raw `text`."""

    source: str
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None


def detect_format(fields: dict[str, Any], source: str) -> str:
    """Guess the format of a record from its keys."""
    if "messages" in fields or "conversations" in fields or {"prompt", "completion"} <= fields.keys():
        return "messages"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    if "text" in fields:
        return "text"
    raise DataError(
        f"{source}: cannot tell the data format from the fields {sorted(fields)}; expected 'messages' "
        "(or 'conversations'), 'instruction'+'output' (alpaca), or 'text'. Set data.format to say which."
    )


def _require_str(fields: dict[str, Any], key: str, source: str, optional: bool = False) -> str | None:
    value = fields.get(key)
    if value is None or value == "":
        if optional:
            return None
        raise DataError(f"{source}: field '{key}' is missing or empty")
    if not isinstance(value, str):
        raise DataError(f"{source}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(fields: dict[str, Any], source: str) -> list[dict[str, str]]:
    if "prompt" in fields and "completion" in fields and "messages" not in fields:
        return [
            {"role": "user", "content": _require_str(fields, "prompt", source)},
            {"role": "assistant", "content": _require_str(fields, "completion", source)},
        ]
    key = "messages" if "messages" in fields else "conversations"
    turns = fields.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: field '{key}' must be a non-empty list of messages")
    out = []
    for i, turn in enumerate(turns):
        where = f"{source}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected an object with role/content, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLES:
            raise DataError(f"{where}: unknown role {role!r}; use one of system, user, assistant (or human, gpt)")
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'content' must be a string, got {type(content).__name__}")
        out.append({"role": _ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{source}: the conversation has no assistant message to learn from")
    return out


def _alpaca(fields: dict[str, Any], source: str) -> list[dict[str, str]]:
    instruction = _require_str(fields, "instruction", source)
    extra = _require_str(fields, "input", source, optional=True)
    output = _require_str(fields, "output", source)
    system = _require_str(fields, "system", source, optional=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def to_example(record: Record, fmt: str = "auto", system: str | None = None) -> Example:
    """Normalise one record. `system` is added to conversations that have no system message."""
    if fmt == "auto":
        fmt = detect_format(record.fields, record.source)
    if fmt == "text":
        return Example(record.source, text=_require_str(record.fields, "text", record.source))
    messages = _messages(record.fields, record.source) if fmt == "messages" else _alpaca(record.fields, record.source)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return Example(record.source, messages=tuple(messages))
