"""Tokenize conversations and text, with labels masked to the tokens the model should learn.

Conversations are rendered with the tokenizer's chat template: the same template `deltatune
generate` uses, so a model is trained on exactly the prompt format it will see. The label mask is
derived from character spans: for assistant turn i, the text from the end of
`render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i+1])` is the
reply (its end-of-turn token included, so the model learns to stop). Tokens starting inside such a
span keep their id as label; every other label is IGNORE (-100).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from deltatune.errors import DataError

__all__ = [
    "IGNORE",
    "Tokenized",
    "render_chat",
    "chat_template_of",
    "tokenize_conversation",
    "tokenize_text",
    "CHATML_TEMPLATE",
]

IGNORE = -100
"""Label value that the loss skips."""

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Used for models whose tokenizer has no chat template."""


@dataclass(frozen=True)
class Tokenized:
    """One tokenized example. `labels[t]` is the target for position t (IGNORE where no loss)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: bool = False

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template conversations are rendered with: the tokenizer's own, else ChatML. Runs save it
    beside the adapter (`chat_template.jinja`) so inference renders prompts exactly as training did."""
    return tokenizer.chat_template or CHATML_TEMPLATE


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    """The conversation as text, through `chat_template_of(tokenizer)`."""
    return tokenizer.apply_chat_template(
        list(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template_of(tokenizer),
    )


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], text: str, source: str):
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if not (through.startswith(prompt) and text.startswith(through)):
            raise DataError(
                f"{source}: the model's chat template renders earlier turns differently once later turns "
                "are added, so assistant tokens cannot be located; set data.train_on_inputs: true"
            )
        spans.append((len(prompt), len(through)))
    return spans


def _finish(ids: list[int], labels: list[int], source: str, max_length: int) -> Tokenized:
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token (and packed documents never leak)
    return Tokenized(ids, labels, source, truncated)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_length: int,
    train_on_inputs: bool = False,
    source: str = "",
) -> Tokenized:
    """Render, tokenize and mask one conversation (labels on assistant replies only, unless
    `train_on_inputs`)."""
    text = render_chat(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if train_on_inputs:
        labels = list(ids)
    else:
        spans = _assistant_spans(tokenizer, messages, text, source)
        labels = [
            token if any(lo <= start < hi for lo, hi in spans) else IGNORE
            for token, (start, _) in zip(ids, encoding["offset_mapping"], strict=True)
        ]
    return _finish(ids, labels, source, max_length)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, source: str = "") -> Tokenized:
    """Tokenize raw text (BOS if the tokenizer adds one, EOS appended); every token is a label."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return _finish(ids, list(ids), source, max_length)
