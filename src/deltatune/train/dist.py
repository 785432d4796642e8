"""Several processes: the torch.distributed process group, who-am-I facts, and the few collectives
the loop needs.

deltatune scales out on PyTorch's own engine. `torchrun` (or `deltatune train --nproc N`, which
starts torchrun) launches one process per device and sets RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT; `session()` joins the process group (NCCL for CUDA tensors, gloo for CPU
ones) with a timeout, so a collective that waits on a rank that died fails instead of hanging.
In a single process every helper here returns the one-process answer without communicating, so
the training loop keeps one code path.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from deltatune.errors import ConfigError, DataError, TrainingError, UserError

__all__ = [
    "RankFailure",
    "session",
    "launched_by_torchrun",
    "is_distributed",
    "rank",
    "local_rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "gather_objects",
    "on_main",
    "main_first",
    "guard",
    "torchrun_command",
    "launch",
]

T = TypeVar("T")


class RankFailure(TrainingError):
    """A collective failed: another rank stopped (error, kill, timeout) and this one cannot go on."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's index on its machine (its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes logs, metrics, checkpoints, adapters and summaries."""
    return rank() == 0


_STATE = {"timeout_s": 0, "failed": False}


@contextmanager
def session(device: str = "auto", timeout_s: int = 600) -> Iterator[None]:
    """Join torchrun's process group (a no-op in a single process, or when already joined).

    Backend: NCCL for CUDA tensors plus gloo for the CPU ones (small counters, objects), or gloo
    alone on CPU. `timeout_s` bounds every collective: when a rank dies, the others fail within
    it instead of waiting forever. The group lives until the process exits (torch cannot join
    torchrun's group a second time in one process), so several runs can share it.
    """
    if launched_by_torchrun() and not tdist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= gpus:
                raise UserError(
                    f"{os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes were started on this machine but it has "
                    f"{gpus} GPU(s); start one process per GPU (--nproc {gpus}, torchrun --nproc-per-node {gpus})"
                )
            torch.cuda.set_device(local)
        tdist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        _STATE["timeout_s"] = timeout_s
        atexit.register(_teardown)
    try:
        yield
    except BaseException:
        _STATE["failed"] = True
        raise


def _teardown() -> None:
    # After a failure a peer may be gone and tearing down could wait on it; the process is
    # exiting anyway.
    if tdist.is_initialized() and not _STATE["failed"]:
        tdist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# gloo reports a lost peer as a plain RuntimeError; these words tell it from other errors.
_COMMUNICATION = re.compile(r"gloo|nccl|connection|timed out|timeout|broken pipe|peer", re.IGNORECASE)


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn a failed collective inside the block into a `RankFailure` naming this rank."""
    try:
        yield
    except RuntimeError as exc:
        if not isinstance(exc, tdist.DistError) and not _COMMUNICATION.search(str(exc)):
            raise
        raise RankFailure(
            f"rank {rank()}: {what} failed, so another rank has stopped (an error, a kill, or no answer within "
            f"train.dist_timeout={_STATE['timeout_s']}s); this rank stops too. The torchrun summary names the rank "
            f"that failed first. ({_first_line(exc)})"
        ) from exc


def barrier() -> None:
    if is_distributed():
        with guard("waiting for the other ranks"):
            tdist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks (float64); in one process the values come back unchanged."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    with guard("summing counters over ranks"):
        tdist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    with guard("gathering state from every rank"):
        tdist.all_gather_object(out, obj)
    return out


_ERRORS: dict[str, type[UserError]] = {cls.__name__: cls for cls in (UserError, ConfigError, DataError, TrainingError)}


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (e.g. creating the run directory) and hand its result to every rank.

    A user error raised on rank 0 is raised on every rank with the same message, so the job stops
    at once instead of leaving the other ranks waiting for rank 0.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except UserError as exc:
            error, box[0] = exc, ("user", type(exc).__name__, str(exc))
        except BaseException as exc:
            error, box[0] = exc, ("crash", type(exc).__name__, _first_line(exc))
    with guard("waiting for rank 0"):
        tdist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, *payload = box[0]
    if kind == "ok":
        return payload[0]
    if kind == "user":
        raise _ERRORS.get(payload[0], UserError)(payload[1])
    raise RankFailure(f"rank {rank()}: rank 0 failed ({payload[0]}: {payload[1]}); stopping")


def main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the others (e.g. filling a cache that one process must write)."""
    result = on_main(fn)
    return result if is_main() else fn()


# ---- launching -----------------------------------------------------------------------------------
def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The torchrun command that runs `deltatune ARGS` in `nproc` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",  # a failed rank ends the job (resume from the last checkpoint)
        "-m",
        "deltatune",
        *args,
    ]


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run `deltatune ARGS` under torchrun with `nproc` processes; return torchrun's exit status.

    Ctrl-C reaches torchrun and the workers directly (same process group), so they write a
    checkpoint and stop; this parent waits for them instead of dying first. SIGTERM is forwarded.
    """
    child = subprocess.Popen(torchrun_command(nproc, args))
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
    }
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
