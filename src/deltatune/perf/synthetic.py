"""Synthetic chat data for benchmarks and memory calibration: deterministic, any size.

Each example is a user question and an assistant answer made of common English words, with
lengths drawn so that tokenized examples average about `mean_tokens` (PERFORMANCE.md's baseline
used a mean of 175). Real text is not needed to measure speed and memory: only the shapes are.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["synthetic_chats", "write_synthetic_chats"]

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part over new sound take only little work know place year live "
    "me back give most very after thing our just name good sentence man think say great where help through "
    "much before line right too mean old any same tell boy follow came want show also around form three "
    "small set put end does another well large must big even such because turn here why ask went men read "
    "need land different home us move try kind hand picture again change off play spell air away animal"
).split()

# Template and role tokens around the text (SmolLM2's chat template with its default system
# message adds ~30), and ~1.3 tokens per word of this vocabulary.
_OVERHEAD_TOKENS = 30
_TOKENS_PER_WORD = 1.3


def synthetic_chats(n: int, mean_tokens: int = 175, seed: int = 0, spread: float = 0.6) -> list[dict]:
    """`n` chat records ({"messages": [user, assistant]}); lengths uniform in
    mean x [1 - spread, 1 + spread] tokens, a quarter of them the question."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = mean_tokens * rng.uniform(1 - spread, 1 + spread)
        words = max(4, round((tokens - _OVERHEAD_TOKENS) / _TOKENS_PER_WORD))
        ask = max(2, words // 4)
        question = " ".join(rng.choice(_WORDS) for _ in range(ask)).capitalize() + "?"
        answer = " ".join(rng.choice(_WORDS) for _ in range(words - ask)).capitalize() + "."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def write_synthetic_chats(path: str | Path, n: int, mean_tokens: int = 175, seed: int = 0, spread: float = 0.6) -> Path:
    """Write `synthetic_chats(...)` as JSON lines to `path` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chats(n, mean_tokens, seed, spread)))
    return path
