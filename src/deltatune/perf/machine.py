"""Facts about the machine a run lands on: memory available, matmul peak, CPU features."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

__all__ = ["available_memory_bytes", "current_rss_bytes", "matmul_peak_flops", "cpu_description"]


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory a run on `device` can still use: free GPU memory, or on a CPU MemAvailable plus what
    this process already holds (the estimate counts this process's own memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    info = _meminfo()
    available = info.get("MemAvailable", 0) + current_rss_bytes()
    limit = _cgroup_limit()
    return min(available, limit) if limit else available


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return None


def matmul_peak_flops(dtype: torch.dtype = torch.float32, seconds: float = 1.0, shape=(2048, 2048, 2048)) -> float:
    """Measured FLOP/s of a large matmul on the CPU (the best of several repetitions), the
    denominator of model FLOPs utilisation."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm up (thread pool, MKL/oneDNN dispatch)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def cpu_description() -> str:
    """CPU model, thread count and the SIMD features that decide fp32/bf16 matmul speed."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {'+'.join(simd) or 'no AVX'}"
