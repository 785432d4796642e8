"""The training loop shared by the supervised recipes (pt, sft, classify, ...).

One optimizer step = `grad_accum` micro-batches. The loss of each micro-batch is a *sum* over its
label tokens divided by the label tokens of the whole step, so accumulating 4 micro-batches of 2
gives the same gradient as one batch of 8. The loop evaluates, checkpoints, stops cleanly on
Ctrl-C/SIGTERM (after writing a checkpoint) and refuses to step on a NaN/inf loss.

Under torchrun the same loop runs on every rank (train/dist.py, train/parallel.py): each rank takes
its share of every step's micro-batches, the unit count is summed over ranks before the backward
passes, gradients are synchronised only on the last micro-step, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config import TrainConfig
from deltatune.data.loader import BatchStream
from deltatune.deltas import DeltaSet
from deltatune.errors import Interrupted, TrainingError
from deltatune.train import dist
from deltatune.train.allocator import release_freed_memory
from deltatune.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from deltatune.train.logs import RunLogger
from deltatune.train.optim import build_optimizer, build_schedule
from deltatune.train.parallel import Parallel, call, is_sharded, wrap

__all__ = ["LossFn", "TrainResult", "Interrupted", "train", "evaluate", "autocast_for", "resolve_device", "total_steps"]

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple]
"""(model, batch) -> (summed loss over the batch's units, number of units), e.g. label tokens; it
may add a third item, a dict of other per-unit metrics summed over the batch (logged per unit)."""


@dataclass
class TrainResult:
    step: int = 0
    final_loss: float = float("nan")
    final_eval_loss: float | None = None
    final_eval_metrics: dict[str, float] = field(default_factory=dict)
    """Everything the last evaluation returned (`eval_fn` may return a dict of metrics)."""
    train_tokens: int = 0
    """Non-padding input tokens processed (this session and any resumed one)."""
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """The device to train on; under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is cuda but no CUDA device is available; use device: cpu or auto")
    if name == "cuda" and dist.is_distributed():
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it, bf16
    matmuls are emulated and run ~100x slower than fp32 (measured: 1 vs 135 GFLOP/s on AVX2)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_for(cfg: TrainConfig, device: torch.device):
    """The autocast context for the configured precision (`auto`: bf16 on a bf16-capable GPU)."""
    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse bf16 on a CPU that can only emulate it (it would take ~100x longer than fp32)."""
    if cfg.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise TrainingError(
            "train.precision is bf16, but this CPU has no native bf16 (no avx512_bf16/amx in /proc/cpuinfo): "
            "bf16 matmuls would be emulated, ~100x slower than fp32. Use train.precision: fp32 (or auto)."
        )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant: works with a frozen base,
    whose inputs need no gradient)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise TrainingError("train.gradient_checkpointing needs a Hugging Face model (gradient_checkpointing_enable)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil((cfg.epochs or 1.0) * batches_per_epoch / cfg.grad_accum))


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step; a second
    SIGINT interrupts at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch."""
    mask = batch.get("attention_mask", batch.get("token_mask"))
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    device: torch.device,
    autocast=nullcontext,
) -> float:
    """Mean loss per unit over `batches`, streamed (no logits are kept).

    Under torchrun each rank takes every world_size-th batch and the sums are added over ranks,
    so the result is the single-process one (up to float summation order).
    """
    was_training = model.training
    model.eval()
    rank, world = dist.rank(), dist.world_size()
    total, count, mine, seen, first = 0.0, 0, 0, 0, None
    for seen, batch in enumerate(batches, start=1):
        first = batch if first is None else first
        if (seen - 1) % world != rank:
            continue
        with autocast():
            loss_sum, n = call(model, loss_fn, _to(batch, device))[:2]
        total += float(loss_sum)
        count += n
        mine += 1
    # FSDP gathers parameters inside every forward: all ranks must run as many forwards, so a
    # rank with one batch fewer runs a throw-away one.
    for _ in range(-(-seen // world) - mine if is_sharded(model) else 0):
        with autocast():
            call(model, loss_fn, _to(first, device))
    total, count = dist.all_reduce_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def _restore(
    checkpoint: Path, parallel: Parallel, optimizer: torch.optim.Optimizer, schedule: Any, stream: BatchStream
) -> tuple[int, int]:
    """Load a checkpoint (written with any number of processes) into this rank; (step, train tokens)."""
    weights, optim_state, state = load_checkpoint(checkpoint)
    parallel.load_weights(weights)
    parallel.load_optimizer_state(optimizer, optim_state)
    schedule.load_state_dict(state["schedule"])
    stream.load_state_dict(state["stream"])
    per_rank = state.get("rng_ranks") or [state["rng"]]
    rank = dist.rank()
    set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
    if rank >= len(per_rank):  # more ranks than wrote the checkpoint: give this one its own dropout masks
        torch.manual_seed(state["step"] * 1009 + rank)
    return state["step"], state["train_tokens"]


def _write_checkpoint(
    run_dir: Path,
    step: int,
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    stream: BatchStream,
    train_tokens: int,
    cfg: TrainConfig,
) -> Path:
    """Rank 0 writes one checkpoint in the single-process format (full tensors); under FSDP every
    rank first joins in gathering the shards. Returns once the checkpoint is complete."""
    weights = parallel.weights()
    optim_state = parallel.optimizer_state(optimizer)
    rngs = dist.gather_objects(rng_state())
    state: dict[str, Any] = {"schedule": schedule.state_dict(), "stream": stream.state_dict(), "train_tokens": train_tokens}
    if len(rngs) > 1:
        state["rng_ranks"] = rngs
    path = Path(run_dir) / "checkpoints" / f"step-{step}"
    if dist.is_main():
        path = save_checkpoint(run_dir, step, weights, optim_state, state, keep=cfg.keep_checkpoints)
    dist.barrier()
    return path


def _run_eval(eval_fn: Callable[[], float | dict[str, float]], result: TrainResult) -> dict[str, float]:
    """Call `eval_fn`, keep its metrics on `result`, and return them as `eval_*` log fields."""
    value = eval_fn()
    metrics = dict(value) if isinstance(value, dict) else {"loss": float(value)}
    result.final_eval_metrics = metrics
    result.final_eval_loss = metrics.get("loss")
    return {f"eval_{key}": val for key, val in metrics.items()}


def _eval_text(result: TrainResult) -> str:
    return "eval " + ", ".join(f"{key} {val:.4f}" for key, val in result.final_eval_metrics.items())


def train(
    model: nn.Module,
    deltas: DeltaSet,
    stream: BatchStream,
    loss_fn: LossFn,
    count_fn: Callable[[dict[str, torch.Tensor]], int],
    cfg: TrainConfig,
    run_dir: Path,
    eval_fn: Callable[[], float] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Optimise the deltas' parameters of `model` over `stream` (see module docstring).

    Args:
        loss_fn: summed loss and unit count of one micro-batch.
        count_fn: units (e.g. label tokens) of a micro-batch, computed before the forward pass.
        eval_fn: returns the eval loss, or a dict of eval metrics (with `loss` if there is one), logged
            with an `eval_` prefix; called every `cfg.eval_every` steps and at the end.
    """
    device = next(model.parameters()).device
    check_precision(cfg, device)
    release_freed_memory()  # peak RSS follows live tensors (train/allocator.py)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    autocast = lambda: autocast_for(cfg, device)  # noqa: E731
    rank, world = dist.rank(), dist.world_size()
    stream.shard(rank, world)
    parallel = wrap(model, deltas, cfg.distributed, device)
    optimizer = build_optimizer(parallel.params, cfg)
    steps = total_steps(cfg, stream.batches_per_epoch)
    schedule = build_schedule(optimizer, cfg, steps)
    result = TrainResult()
    if world > 1:
        torch.manual_seed(cfg.seed + rank)  # dropout masks differ between ranks (weights are already set)

    start = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        start, result.train_tokens = _restore(checkpoint, parallel, optimizer, schedule, stream)
        result.step = start
        log(f"resumed from {checkpoint} (step {start} of {steps})")
    elif resume:
        log(f"resume: no checkpoint in {run_dir}; starting from step 0")

    def write_checkpoint(step: int) -> Path:
        return _write_checkpoint(run_dir, step, parallel, optimizer, schedule, stream, result.train_tokens, cfg)

    logger = RunLogger(run_dir, steps, start, enabled=dist.is_main())
    model.train()
    started = time.perf_counter()
    session_tokens = 0
    try:
        with _stop_on_signals() as stop:
            for step in range(start + 1, steps + 1):
                step_started = time.perf_counter()
                deltas.on_step(step)  # e.g. gradual unfreezing: a pure function of the step, so resume is exact
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                (units,) = dist.all_reduce_sum([sum(count_fn(b) for b in micro)])
                loss_total, regularizer, extras = 0.0, None, {}
                for i, batch in enumerate(micro):
                    batch = _to(batch, device)
                    last = i == len(micro) - 1
                    with parallel.sync_gradients(last), dist.guard("the gradient exchange"):
                        with autocast():
                            loss_sum, *extra = parallel(loss_fn, batch)
                        # DDP and FSDP average gradients over ranks; scaling by `world` makes that the
                        # gradient of (summed loss of all ranks) / (units of all ranks).
                        objective = loss_sum * world / max(units, 1)
                        if last and (regularizer := deltas.regularizer()) is not None:
                            # a delta's own term (diff pruning's L0 penalty), once per step; the same
                            # on every rank, so the ranks' average keeps it
                            objective = objective + regularizer
                        objective.backward()
                    loss_total += float(loss_sum.detach())
                    # a stage's own sums to log (e.g. DPO's rewards), per unit like the loss
                    for key, value in (extra[1] if len(extra) > 1 else {}).items():
                        extras[key] = extras.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
                tokens = sum(_input_tokens(b) for b in micro)
                loss_total, tokens, stopping, *sums = dist.all_reduce_sum([loss_total, tokens, stop["stop"], *extras.values()])
                extras = dict(zip(extras, sums, strict=True))
                loss = loss_total / max(units, 1)
                if not math.isfinite(loss):
                    last = latest_checkpoint(run_dir)
                    raise TrainingError(
                        f"the loss became {loss} at step {step}; training stopped before the weights were updated. "
                        f"Last good checkpoint: {last or 'none'}. Try a lower train.lr, train.precision: fp32, "
                        "or check the data for empty or extreme examples."
                    )
                grad_norm = parallel.clip_grad_norm(cfg.max_grad_norm) if cfg.max_grad_norm else None
                lr = schedule.get_last_lr()[0]
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)

                tokens = int(tokens)
                session_tokens += tokens
                result.train_tokens += tokens
                tokens_per_s = tokens / max(time.perf_counter() - step_started, 1e-9)
                record: dict[str, Any] = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "epoch": stream.epoch}
                record.update({key: value / max(units, 1) for key, value in extras.items()})
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if regularizer is not None:
                    record["regularizer"] = float(regularizer.detach())
                if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                    record.update(_run_eval(eval_fn, result))
                    logger.write(f"step {step}: " + _eval_text(result))
                if step % cfg.log_every == 0 or step == steps or "eval_loss" in record:
                    logger.log(step, record)
                result.history.append({"step": step, **record})
                logger.progress(loss, lr, tokens_per_s)
                result.step, result.final_loss = step, loss

                if stopping:
                    raise Interrupted(step, write_checkpoint(step))
                if cfg.save_every and step % cfg.save_every == 0 and step != steps:
                    write_checkpoint(step)
            if result.step:
                write_checkpoint(result.step)
            deltas.on_train_end()  # after the checkpoint, so a resumed run continues from the unprojected state
            if eval_fn is not None:
                logger.log(steps, _run_eval(eval_fn, result))
                logger.write("final " + _eval_text(result))
    finally:
        logger.close()
    result.wall_s = time.perf_counter() - started
    result.tokens_per_s = session_tokens / max(result.wall_s, 1e-9)
    return result
