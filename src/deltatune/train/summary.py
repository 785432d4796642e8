"""`summary.json`: the headline numbers of a run, merged with what later commands add."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["peak_memory_bytes", "update_summary", "read_summary"]


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak resident set size."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        # VmHWM belongs to this process's own address space; ru_maxrss survives exec, so a process
        # started from a large parent (a test runner, a notebook) would report the parent's peak
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_summary(run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into run_dir/summary.json (written atomically) and return the whole summary."""
    summary = {**read_summary(run_dir), **values}
    path = Path(run_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    tmp.replace(path)
    return summary
