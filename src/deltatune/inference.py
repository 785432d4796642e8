"""Inference: load a base model with an adapter, and generate from prompts.

Chat models get their prompt through the same chat template training used (data/tokenize.py),
so a tuned model sees at inference exactly the format it learned. Greedy decoding by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltatune.data.tokenize import CHATML_TEMPLATE, chat_template_of, render_chat
from deltatune.deltas import DeltaSet
from deltatune.errors import UserError
from deltatune.export.peft_format import load_deltas, read_adapter_config
from deltatune.models import load_model
from deltatune.train.parallel import call, is_sharded

__all__ = ["TEMPLATE_FILE", "resolve_adapter_dir", "load_for_inference", "build_prompt", "generate", "save_chat_template"]

TEMPLATE_FILE = "chat_template.jinja"


def save_chat_template(tokenizer: PreTrainedTokenizerBase, adapter_dir: str | Path) -> None:
    """Store the chat template training used beside the adapter (read back by load_for_inference)."""
    (Path(adapter_dir) / TEMPLATE_FILE).write_text(chat_template_of(tokenizer))


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter directory, given it or a run directory that holds `adapter/`."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    raise UserError(f"{path} is neither an adapter directory nor a run directory with adapter/ in it")


def load_for_inference(
    model: str | None, adapter: str | Path | None = None, merge: bool = True
) -> tuple[nn.Module, PreTrainedTokenizerBase, DeltaSet | None]:
    """(model, tokenizer, deltas) in eval mode; the adapter is merged when it can be (faster)."""
    adapter_dir = resolve_adapter_dir(adapter) if adapter else None
    if model is None:
        if adapter_dir is None:
            raise UserError("give --model (or --adapter, whose config names its base model)")
        model = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if not model:
            raise UserError(f"{adapter_dir}/adapter_config.json names no base model; give --model")
    base, tokenizer = load_model(model)
    deltas = load_deltas(base, adapter_dir) if adapter_dir else None
    template = adapter_dir / TEMPLATE_FILE if adapter_dir else None
    if template is not None and template.is_file():
        tokenizer.chat_template = template.read_text()  # the template the adapter was trained with
    if deltas is not None and merge and all(d.mergeable for d in deltas):
        deltas.merge()
    base.eval()
    return base, tokenizer, deltas


def build_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[dict[str, str]], system: str | None = None) -> str:
    """The text the model is given: the chat template for chat models, the raw prompt otherwise."""
    if tokenizer.chat_template is None and isinstance(prompt, str):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return render_chat(tokenizer, messages, add_generation_prompt=True)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    max_new_tokens: int = 128,
    system: str | None = None,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 16,
    streamer=None,
) -> list[str]:
    """Complete each prompt (batched, left-padded); returns the new text of each, special tokens removed."""
    device = next(model.parameters()).device
    texts = [build_prompt(tokenizer, p, system) for p in prompts]
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
            # A model trained with the ChatML fallback ends its turns with <|im_end|>, which may be
            # plain text (not EOS) for its tokenizer: stop there too.
            stops = {"stop_strings": ["<|im_end|>"], "tokenizer": tokenizer} if tokenizer.chat_template == CHATML_TEMPLATE else {}
            # A model sharded by FSDP generates through its root (which gathers the weights), in
            # step with the other ranks until all are done (synced_gpus).
            options = {
                **stops,
                "max_new_tokens": max_new_tokens,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "streamer": streamer,
                "synced_gpus": is_sharded(model),
                **sampling,
            }
            out = call(model, _generate, dict(enc), options)
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return outputs


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor], options: dict) -> torch.Tensor:
    return model.generate(**inputs, **options)
