"""A reward a program can check, for the RL examples (configs/grpo-smollm2.yaml, configs/ppo-smollm2.yaml).

The prompts (build_data.py) are short questions that end with "Answer in at most 8 words." SmolLM2-135M-Instruct
tends to answer at length, so the reward measures whether it follows that instruction, in the
required shape, and still answers:

    reward = 0.5 * brevity + 0.25 * sentence + 0.25 * correct

- brevity: 1 for at most MAX_WORDS words, falling linearly to 0 at 2 * MAX_WORDS words;
- sentence: the reply is one line that ends with '.', '!' or '?' (a finished sentence, not a list
  and not a reply cut off at the token limit);
- correct: the reference answer (the record's `answer` field) appears in the reply as a word.

Used as `reward_fn: examples/rlhf/rewards.py:concise_answer` (called like a TRL reward function).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["MAX_WORDS", "concise_answer", "parts"]

MAX_WORDS = 8


def parts(completion: str, answer: str | None) -> dict[str, float]:
    """The three checked parts of one reply, each in [0, 1]."""
    text = completion.strip()
    words = len(text.split())
    brevity = 1.0 if 0 < words <= MAX_WORDS else max(0.0, 1.0 - (words - MAX_WORDS) / MAX_WORDS) if words else 0.0
    sentence = float(bool(text) and "\n" not in text and text[-1] in ".!?")
    correct = 0.0
    if answer:
        correct = float(re.search(rf"(?<![\w-]){re.escape(answer.lower())}(?![\w-])", text.lower()) is not None)
    return {"brevity": brevity, "sentence": sentence, "correct": correct}


def concise_answer(prompts: Sequence, completions: Sequence[str], answer: Sequence[str] | None = None, **_) -> list[float]:
    """One reward in [0, 1] per completion (see the module docstring)."""
    answers = list(answer) if answer is not None else [None] * len(completions)
    rewards = []
    for completion, ref in zip(completions, answers, strict=True):
        p = parts(completion, ref)
        rewards.append(0.5 * p["brevity"] + 0.25 * p["sentence"] + 0.25 * p["correct"])
    return rewards
