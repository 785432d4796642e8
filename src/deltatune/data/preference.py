"""Preference pairs (`reward`, `dpo`) and prompt-only data (`ppo`, `grpo`).

Pair records hold `prompt`, `chosen` and `rejected`, each a plain string or a list of messages
(`{"role", "content"}`), as in TRL's preference datasets:

    {"prompt": "Name a fruit.", "chosen": "A pear.", "rejected": "I like cars."}
    {"prompt": [{"role": "user", "content": "Name a fruit."}],
     "chosen": [{"role": "assistant", "content": "A pear."}], "rejected": [...]}

A record may also leave out `prompt` when `chosen` and `rejected` are whole conversations: their
common leading messages are the prompt (TRL's "implicit prompt"). An optional number `margin`
asks the reward model for a larger gap on that pair (Llama 2's margin loss).

For a chat model the prompt is rendered with the chat template and the generation prompt, and a
completion is what the template adds for the assistant's reply (end-of-turn token included); a
model without a template sees the raw prompt and the completion followed by EOS. The prompt is
tokenized once and shared by both completions, so the two rows differ only in completion tokens,
and only completion tokens carry labels.

Prompt-only records hold `prompt` (string or messages); their other fields (e.g. a reference
answer) are passed on to a reward function.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from deltatune.config import DataConfig
from deltatune.data.dataset import DataReport
from deltatune.data.formats import _ROLES
from deltatune.data.readers import Record, read_records
from deltatune.data.tokenize import IGNORE, render_chat
from deltatune.errors import DataError

__all__ = [
    "Messages",
    "PairExample",
    "PromptExample",
    "PairRow",
    "to_pair",
    "to_prompt",
    "prompt_text",
    "completion_text",
    "encode_prompt",
    "encode_completion",
    "tokenize_pair",
    "collate_pairs",
    "load_pairs",
    "load_prompts",
    "split_records",
    "build_pair_data",
]

Messages = tuple[dict[str, str], ...]


@dataclass(frozen=True)
class PairExample:
    """A prompt with a preferred and a rejected completion."""

    source: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    margin: float | None = None


@dataclass(frozen=True)
class PromptExample:
    """A prompt to complete (RL stages) and the record's other fields, for the reward function."""

    source: str
    prompt: str | Messages
    fields: dict[str, Any] = field(default_factory=dict)


def _messages(value: Any, source: str, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: field '{key}' must be a string or a non-empty list of messages")
    out = []
    for i, turn in enumerate(value):
        where = f"{source}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected an object with role/content, got {type(turn).__name__}")
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role not in _ROLES:
            raise DataError(f"{where}: unknown role {role!r}; use one of system, user, assistant")
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'content' must be a string, got {type(content).__name__}")
        out.append({"role": _ROLES[role], "content": content})
    return tuple(out)


def _text_or_messages(fields: dict[str, Any], key: str, source: str) -> str | Messages:
    value = fields.get(key)
    if value is None or value == "" or value == []:
        raise DataError(f"{source}: field '{key}' is missing or empty (pairs need prompt, chosen and rejected)")
    return value if isinstance(value, str) else _messages(value, source, key)


def to_pair(record: Record) -> PairExample:
    """Validate one preference record (see module docstring)."""
    fields, source = record.fields, record.source
    chosen = _text_or_messages(fields, "chosen", source)
    rejected = _text_or_messages(fields, "rejected", source)
    if fields.get("prompt") in (None, "", []):
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise DataError(f"{source}: field 'prompt' is missing (it may only be left out when chosen and "
                            "rejected are whole conversations that share their first messages)")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError(f"{source}: no 'prompt', and chosen and rejected share no leading messages")
        prompt: str | Messages = chosen[:shared]
        chosen, rejected = chosen[shared:], rejected[shared:]
    else:
        prompt = _text_or_messages(fields, "prompt", source)
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(completion, str) and completion[0]["role"] != "assistant":
            raise DataError(f"{source}: field '{key}' must start with an assistant message")
    margin = fields.get("margin")
    if margin is not None and not isinstance(margin, int | float):
        raise DataError(f"{source}: field 'margin' must be a number, got {type(margin).__name__}")
    return PairExample(source, prompt, chosen, rejected, None if margin is None else float(margin))


def to_prompt(record: Record) -> PromptExample:
    """Validate one prompt-only record; its other fields are kept for the reward function."""
    fields, source = record.fields, record.source
    if "prompt" not in fields:
        raise DataError(f"{source}: field 'prompt' is missing (ppo and grpo data hold prompts to complete); "
                        f"fields here: {sorted(fields)}")
    prompt = _text_or_messages(fields, "prompt", source)
    if not isinstance(prompt, str) and prompt[-1]["role"] == "assistant":
        raise DataError(f"{source}: field 'prompt' ends with an assistant message; end it with the user's turn")
    return PromptExample(source, prompt, {k: v for k, v in fields.items() if k != "prompt"})


def _as_messages(prompt: str | Messages, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def _chat(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages) -> bool:
    """Render through the chat template: always for chat models, and for message lists."""
    return tokenizer.chat_template is not None or not isinstance(prompt, str)


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, system: str | None = None) -> str:
    """The text a completion follows: the chat template with the generation prompt, or the raw prompt."""
    if not _chat(tokenizer, prompt):
        return prompt  # type: ignore[return-value]
    return render_chat(tokenizer, _as_messages(prompt, system), add_generation_prompt=True)


def completion_text(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Messages,
    completion: str | Messages,
    system: str | None = None,
    source: str = "",
) -> str:
    """The text of `completion` after `prompt_text(prompt)`: the assistant turn as the chat template
    writes it (end-of-turn included), or the raw completion + EOS without a template."""
    if not _chat(tokenizer, prompt):
        return f"{completion}{tokenizer.eos_token or ''}"
    messages = _as_messages(prompt, system)
    reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    head = render_chat(tokenizer, messages, add_generation_prompt=True)
    full = render_chat(tokenizer, [*messages, *reply])
    if not full.startswith(head):
        raise DataError(f"{source}: the chat template renders the prompt differently once a reply follows; "
                        "cannot separate prompt from completion for this model")
    return full[len(head):]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, system: str | None = None) -> list[int]:
    """Token ids of `prompt_text` (BOS added only when there is no chat template to provide it)."""
    text = prompt_text(tokenizer, prompt, system)
    return list(tokenizer(text, add_special_tokens=not _chat(tokenizer, prompt))["input_ids"])


def encode_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Messages,
    completion: str | Messages,
    system: str | None = None,
    source: str = "",
) -> list[int]:
    """Token ids of `completion_text`."""
    text = completion_text(tokenizer, prompt, completion, system, source)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class PairRow:
    """A tokenized pair: the shared prompt and the two completions."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    """Position of the pair in its split (to look up precomputed reference log-probs)."""
    margin: float | None = None
    truncated: bool = False


def _fit(prompt: list[int], completions: Sequence[list[int]], max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Truncate so prompt + the longer completion fit in `max_length`: completions lose their end;
    a prompt longer than half the budget loses its start (the most recent turns matter most)."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, list(completions), False
    keep_prompt = min(len(prompt), max(max_length // 2, max_length - longest))
    prompt = prompt[len(prompt) - keep_prompt :]
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions], True


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, example: PairExample, max_length: int, index: int, system: str | None = None
) -> PairRow:
    """Tokenize a pair: prompt ids (shared) and each completion's ids, fitted into `max_length`."""
    prompt_ids = encode_prompt(tokenizer, example.prompt, system)
    completions = [encode_completion(tokenizer, example.prompt, c, system, example.source) for c in (example.chosen, example.rejected)]
    prompt_ids, (chosen, rejected), truncated = _fit(prompt_ids, completions, max_length)
    if not chosen or not rejected:
        raise DataError(f"{example.source}: a completion is empty after tokenization")
    return PairRow(prompt_ids, chosen, rejected, index, example.margin, truncated)


def collate_pairs(rows: Sequence[PairRow], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Batch B pairs as 2B right-padded rows: the B chosen sequences, then the B rejected ones.

    Returns input_ids [2B, T], attention_mask [2B, T], labels [2B, T] (the token itself on
    completion tokens, IGNORE on prompt and padding), index [B], and margin [B] when every pair
    has one.
    """
    sequences = [(r.prompt_ids, r.chosen_ids) for r in rows] + [(r.prompt_ids, r.rejected_ids) for r in rows]
    length = max(len(p) + len(c) for p, c in sequences)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for b, (prompt, completion) in enumerate(sequences):
        n, p = len(prompt) + len(completion), len(prompt)
        input_ids[b, :n] = torch.tensor(prompt + completion)
        labels[b, p:n] = torch.tensor(completion)
        mask[b, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "index": torch.tensor([r.index for r in rows])}
    if all(r.margin is not None for r in rows):
        batch["margin"] = torch.tensor([r.margin for r in rows], dtype=torch.float32)
    return batch


def split_records(
    train: str | None, evaluation: str | None, eval_split: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Train and eval records: from `data.eval`, or `eval_split` of the training file held out."""
    if not train:
        raise DataError("data.train is not set: give the path of a training data file")
    records = read_records(train)
    if evaluation:
        return records, read_records(evaluation)
    if eval_split <= 0:
        return records, []
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    cut = max(1, round(len(shuffled) * eval_split))
    if cut >= len(shuffled):
        raise DataError(f"{train}: data.eval_split={eval_split} leaves no training examples")
    return shuffled[cut:], shuffled[:cut]


def load_pairs(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int, name: str, system: str | None = None
) -> tuple[list[PairRow], DataReport]:
    """Validate and tokenize preference records; a report of sizes and truncation."""
    report = DataReport(name, examples=len(records))
    rows = [tokenize_pair(tokenizer, to_pair(r), max_length, i, system) for i, r in enumerate(records)]
    report.kept = len(rows)
    report.truncated = sum(r.truncated for r in rows)
    report.tokens = sum(len(r.prompt_ids) * 2 + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    report.label_tokens = sum(len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
    return rows, report


def load_prompts(records: Sequence[Record]) -> list[PromptExample]:
    """Validate prompt-only records."""
    return [to_prompt(r) for r in records]


def build_pair_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> tuple[list[PairRow], list[PairRow], list[DataReport]]:
    """Training pairs, eval pairs (possibly none) and a report per split, from `cfg` (data group)."""
    train_records, eval_records = split_records(cfg.train, cfg.eval, cfg.eval_split, seed)
    train, report = load_pairs(train_records, tokenizer, cfg.max_length, f"train ({cfg.train})", cfg.system)
    reports = [report]
    evaluation: list[PairRow] = []
    if eval_records:
        evaluation, eval_report = load_pairs(eval_records, tokenizer, cfg.max_length, f"eval ({cfg.eval or 'split'})", cfg.system)
        reports.append(eval_report)
    return train, evaluation, reports
