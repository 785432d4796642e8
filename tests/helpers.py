"""Helpers shared by tests (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """Short user/assistant exchanges a tiny model can fit (reply = reversed word)."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "robot", "ocean", "maple"]
    rows = []
    for _ in range(n):
        word = rng.choice(words)
        rows.append(
            {"messages": [{"role": "user", "content": f"Reverse {word}"}, {"role": "assistant", "content": word[::-1]}]}
        )
    return rows
