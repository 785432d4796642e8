"""Refuse a run that cannot fit in memory, before loading anything, and name a config that fits.

`deltatune train` calls `check_fits`; `--force` skips it. Candidates are tried from the least to
the most change to the training itself: a smaller micro-batch with more accumulation (the same
updates), gradient checkpointing (the same updates, ~30% more compute), LoRA instead of full
fine-tuning, then QLoRA (LoRA over an NF4 base).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from deltatune.config import RunConfig
from deltatune.errors import TrainingError
from deltatune.perf.estimate import EstimateContext, MemoryEstimate, format_bytes, variant

__all__ = ["check_fits", "fitting_config", "MARGIN"]

MARGIN = 0.92
"""A run must be predicted to use at most this fraction of the available memory (the estimate is
within ~15%; other processes move)."""


def _candidates(cfg: RunConfig) -> Iterator[tuple[list[str], dict[str, Any], str]]:
    """(overrides to print, changes for `variant`, method for the trace), least change first."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    ckpt_options = [cfg.train.gradient_checkpointing] + ([] if cfg.train.gradient_checkpointing else [True])
    methods: list[tuple[list[str], dict[str, Any]]] = [([], {})]
    if any(d.method == "full" for d in cfg.delta):
        from deltatune.deltas.lora import LoraConfig

        methods.append((["delta.method=lora"], {"delta": [LoraConfig(r=16, alpha=32)]}))
    if cfg.quantize == "none" and all(d.method not in ("full", "freeze") for d in cfg.delta):
        methods.append((["quantize=nf4"], {"quantize": "nf4"}))
    elif cfg.quantize == "none":
        from deltatune.deltas.lora import LoraConfig

        methods.append((["delta.method=lora", "quantize=nf4"], {"delta": [LoraConfig(r=16, alpha=32)], "quantize": "nf4"}))
    for method_overrides, method_changes in methods:
        for ckpt in ckpt_options:
            b = batch
            while True:
                overrides = list(method_overrides)
                if b != batch:
                    overrides += [f"train.batch_size={b}", f"train.grad_accum={accum * batch // b}"]
                if ckpt != cfg.train.gradient_checkpointing:
                    overrides.append("train.gradient_checkpointing=true")
                changes = {**method_changes, "train__batch_size": b, "train__grad_accum": accum * batch // b,
                           "train__gradient_checkpointing": ckpt}
                yield overrides, changes, "delta"
                if b == 1:
                    break
                b = max(1, b // 2)
                while batch % b and b > 1:  # keep batch_size x grad_accum unchanged
                    b -= 1


def fitting_config(
    ctx: EstimateContext, cfg: RunConfig, budget: int
) -> tuple[list[str], MemoryEstimate] | None:
    """The first candidate change (see module doc) whose estimate fits in `budget` bytes."""
    for overrides, changes, method in _candidates(cfg):
        if not overrides:
            continue
        est = ctx.estimate(variant(cfg, **changes), method=method)
        if est.peak_memory_bytes <= budget:
            return overrides, est
    return None


def check_fits(cfg: RunConfig, available: int | None = None, world_size: int = 1, log=print) -> MemoryEstimate:
    """Estimate `cfg`; raise TrainingError with the numbers and a config that would fit when the
    run needs more than `available` bytes (default: what this machine has free now)."""
    from deltatune.perf.machine import available_memory_bytes
    from deltatune.train.loop import resolve_device

    ctx = EstimateContext(cfg, world_size)
    est = ctx.estimate(cfg)
    if available is None:
        available = available_memory_bytes(resolve_device(cfg.train.device))
    budget = int(available * MARGIN)
    if world_size > 1 and ctx.device.type == "cpu":
        budget //= world_size  # the ranks of a CPU job share this machine's memory
    log(f"memory estimate: peak {format_bytes(est.peak_memory_bytes)} per process, {format_bytes(available)} available ({est.breakdown()})")
    if est.peak_memory_bytes <= budget:
        return est
    found = fitting_config(ctx, cfg, budget)
    b = est.batch
    message = (
        f"this run needs about {format_bytes(est.peak_memory_bytes)} at its peak, but only "
        f"{format_bytes(available)} is available (the largest micro-batch is {b.rows} rows x {b.length} tokens, "
        f"{b.label_tokens} label tokens).\n  Estimate: {est.breakdown()}.\n  "
    )
    if found:
        overrides, fit = found
        message += f"A config that fits (about {format_bytes(fit.peak_memory_bytes)}): add  {' '.join(overrides)}\n  "
    else:
        message += "No smaller batch, checkpointing or LoRA/QLoRA variant fits either: use a smaller model or max_length.\n  "
    raise TrainingError(message + "To try anyway, run with --force.")
