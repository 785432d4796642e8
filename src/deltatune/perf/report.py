"""What `deltatune estimate` prints: the run's estimate, the comparison of methods, fit or not."""

from __future__ import annotations

import json
from collections.abc import Callable

from deltatune.config import RunConfig
from deltatune.perf.estimate import EstimateContext, compare_methods, flops_rate, format_bytes
from deltatune.perf.fit import MARGIN

__all__ = ["print_estimate"]


def print_estimate(
    cfg: RunConfig, world_size: int = 1, as_json: bool = False, probe: bool = True, echo: Callable[[str], None] = print
) -> dict:
    """Estimate `cfg` and its full/LoRA/QLoRA variants; print a summary (or one JSON object)."""
    from deltatune.perf.machine import available_memory_bytes

    ctx = EstimateContext(cfg, world_size)
    rate = flops_rate(cfg) if probe else None
    est = ctx.estimate(cfg)
    if rate:
        est.time_per_step_s = est.flops_per_step * (4 / 3 if cfg.train.gradient_checkpointing else 1) / rate
    others = compare_methods(cfg, world_size, rate, ctx)
    available = available_memory_bytes(ctx.device)
    fits = est.peak_memory_bytes <= available * MARGIN
    out = {
        **est.as_dict(),
        "device": ctx.device.type,
        "available_memory_bytes": available,
        "fits": fits,
        "compare": {e.label: e.peak_memory_bytes for e in others},
    }
    if as_json:
        echo(json.dumps(out))
        return out
    b = est.batch
    echo(
        f"{cfg.model}, {est.label}, {est.trainable_params:,} of {est.total_params:,} parameters trained, "
        f"largest micro-batch {b.rows} rows x {b.length} tokens ({b.label_tokens} label tokens), {ctx.device.type}"
        + (f", {est.strategy} over {world_size} ranks" if world_size > 1 else "")
    )
    echo(f"peak memory {format_bytes(est.peak_memory_bytes)}" + (" per rank" if world_size > 1 else "") + f": {est.breakdown()}")
    if est.time_per_step_s:
        echo(
            f"time per step ~{est.time_per_step_s:.1f} s ({est.flops_per_step / 1e12:.2f} TFLOP for "
            f"{est.tokens_per_step:,} tokens at {rate / 1e9:.0f} GFLOP/s effective)"
        )
    echo(f"available now {format_bytes(available)}: " + ("fits" if fits else "does NOT fit (deltatune train will refuse)"))
    pairs = [(others[i], others[i + 1]) for i in range(0, len(others), 2)]
    echo(
        "; ".join(
            f"{plain.label} needs {format_bytes(plain.peak_memory_bytes)} ({format_bytes(ck.peak_memory_bytes)} with checkpointing)"
            for plain, ck in pairs
        )
    )
    for note in est.notes:
        echo(note)
    return out
