"""Optimizer and learning-rate schedule.

AdamW with decoupled weight decay (Loshchilov & Hutter 2019), never applied to biases, norm
weights or other 1-D parameters. Schedules: linear warmup, then cosine / linear decay to 0, or
constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from deltatune.config import TrainConfig

__all__ = ["build_optimizer", "build_schedule", "warmup_steps"]


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the deltas' parameters, with a no-decay group for biases and norms.

    Every given parameter is included, also ones frozen for now (gradual unfreezing turns them on
    later): AdamW skips a parameter without a gradient, leaving it and its state untouched.
    """
    decay, no_decay = [], []
    for name, param in named_params:
        (no_decay if _no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: did the delta attach to anything?")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Warmup steps: `warmup` is a fraction of the run when < 1, else a step count."""
    return int(math.ceil(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """Multiplier on the peak lr at each step: linear warmup, then `cfg.schedule`."""
    warm = warmup_steps(cfg, total_steps)
    kind = cfg.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return LambdaLR(optimizer, factor)
