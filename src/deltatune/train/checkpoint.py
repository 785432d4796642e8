"""Resumable checkpoints, written atomically.

`OUTPUT_DIR/checkpoints/step-N/` holds everything needed to continue exactly where the run
stopped: the trainable (delta) weights, the optimizer and schedule state, the RNG states and the
data position. The format does not depend on the number of processes: tensors are full (FSDP
shards are gathered before writing) and the data position counts rows, so a checkpoint written
with N processes resumes with M. It is written into a temporary directory and renamed into place, so a crash
mid-write never leaves a half checkpoint that looks complete; older ones are pruned.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (CUDA: the current device's only; under torchrun each rank has its own)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], list | tuple):  # older checkpoints: every device's state
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `run_dir`, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "state.pt").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones.

    `optimizer` is the optimizer or its state dict (full tensors: under FSDP, gathered first).
    `state` holds plain values and tensors (schedule, data position, counters); RNG states are
    added here.
    """
    optimizer_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}."))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        # state.pt is written last: its presence marks a complete checkpoint.
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, optimizer state, loop state) of a checkpoint; never runs code from the files."""
    path = Path(path)
    weights = load_file(str(path / "weights.safetensors"))
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    state = torch.load(path / "state.pt", weights_only=True)
    return weights, optimizer, state
