"""Small steps every recipe takes: open the run, attach the deltas, save the adapter and summary."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from deltatune.config import RunConfig, config_to_yaml
from deltatune.deltas import DeltaSet, attach
from deltatune.deltas.select import Head, HeadConfig, find_head_modules
from deltatune.export.peft_format import save_deltas
from deltatune.inference import save_chat_template
from deltatune.train.logs import plot_losses
from deltatune.train.rundir import prepare_run_dir
from deltatune.train.summary import peak_memory_bytes, update_summary

__all__ = ["start_run", "attach_deltas", "ensure_head", "finish_run"]


def start_run(cfg: RunConfig, log: Callable[[str], None]) -> Path:
    """Prepare the run directory (config.yaml written), log the config, seed everything."""
    run_dir = prepare_run_dir(cfg)
    log(f"config (saved to {run_dir / 'config.yaml'}):\n{config_to_yaml(cfg)}")
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return run_dir


def ensure_head(deltas: DeltaSet) -> None:
    """Make a new task head (`score`, `classifier`, ...) trainable whatever the delta: a freshly
    initialised head must learn, and LoRA & co. never wrap heads. Adds a `head` delta when the
    configured deltas leave the head frozen."""
    model = deltas.model
    heads = find_head_modules(model)
    trainable = {id(p) for _, p in deltas.named_parameters()}
    frozen = [
        path for path in heads if any(id(p) not in trainable for p in model.get_submodule(path).parameters())
    ]
    if frozen:
        deltas.deltas.append(Head(HeadConfig(modules=frozen), name="default").attach(model))


def attach_deltas(
    model: nn.Module, cfg: RunConfig, device: torch.device, log: Callable[[str], None], new_head: bool = False
) -> DeltaSet:
    """Attach the configured deltas (and a trainable head when `new_head`), move to `device`, log sizes."""
    deltas = attach(model, cfg.delta)
    if new_head:
        ensure_head(deltas)
    model.to(device)
    trainable, total = deltas.num_trainable(), deltas.num_total()
    methods = "+".join(d.config.method for d in deltas)
    log(f"model {cfg.model}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.3f}%, {methods})")
    return deltas


def finish_run(
    run_dir: Path,
    cfg: RunConfig,
    deltas: DeltaSet,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    values: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Save the adapter (PEFT format) with the chat template training used, plot the losses, and
    write the summary (common fields + `values`)."""
    adapter_dir = save_deltas(deltas, run_dir / "adapter", base_model=cfg.model)
    save_chat_template(tokenizer, adapter_dir)
    plot_losses(run_dir)
    summary = update_summary(
        run_dir,
        {
            "model": cfg.model,
            "stage": cfg.stage,
            "methods": [d.config.method for d in deltas],
            "trainable_params": deltas.num_trainable(),
            "total_params": deltas.num_total(),
            **values,
            "peak_memory_bytes": peak_memory_bytes(device),
        },
    )
    log(f"saved the adapter to {adapter_dir}; summary in {run_dir / 'summary.json'}")
    return summary
