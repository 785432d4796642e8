"""Make a CPU process's resident memory follow the memory it actually uses.

glibc serves an allocation from its heap unless it is larger than the mmap threshold, and by
default raises that threshold (up to 32 MiB) every time a large block is freed. A training step
allocates and frees thousands of activation-sized blocks (1-30 MiB), so after the first step
they all come from the heap, where freed blocks leave holes that are reused only by blocks that
fit: measured on a 12-block SmolLM2-shaped LoRA step, resident memory after the forward pass was
1.9 GB for 1.1 GB of live tensors, and it crept up from step to step (the peak RSS of a 7.1 GB
run was 30% above its live peak). A fixed 1 MiB threshold sends every tensor-sized block to
mmap, which returns it to the system when freed: peak RSS then follows live memory (-24% on
that run) for a few percent more system time (page faults on fresh pages; see
docs/performance.md). `DELTATUNE_MALLOC=default` keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["release_freed_memory"]

_M_MMAP_THRESHOLD = -3  # from <malloc.h>
_done = False


def release_freed_memory(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (once); False where
    there is no glibc or `DELTATUNE_MALLOC=default`."""
    global _done
    if _done or os.environ.get("DELTATUNE_MALLOC") == "default":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        _done = False
    return _done
