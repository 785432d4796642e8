"""Make a CPU process's memory allocator fast and its resident memory follow live tensors.

A training step allocates and frees thousands of activation-sized blocks (1-30 MiB). glibc's
malloc serves them from its heap once its adaptive mmap threshold has grown (up to 32 MiB), and
freed blocks leave holes that only blocks that fit can reuse: on SmolLM2 LoRA, peak RSS was 5.5 GB
for ~3.7 GB of live tensors, creeping up from step to step.

Two remedies, best first (docs/performance.md has the measurements):

1. **tcmalloc** (gperftools' `libtcmalloc_minimal.so.4`, Debian package `libtcmalloc-minimal4`,
   what Intel's PyTorch CPU launchers preload): size-class free lists and page-level release.
   On a SmolLM2 LoRA step: 8.0 s and 3.8 GB peak RSS, against glibc's 8.8 s / 5.5 GB. It has to
   replace malloc before the process starts, so the `deltatune` command re-executes itself once
   with `LD_PRELOAD` when the library is installed and not yet loaded (`preload_env`).
2. Otherwise glibc with its mmap threshold fixed at 1 MiB: every tensor-sized block is mmapped
   and returned to the system when freed, so RSS follows live memory (3.75 GB) at the cost of a
   page fault per fresh page (13.6 s per step: much system time).

`DELTATUNE_MALLOC=default` keeps the process's allocator untouched (no re-exec, no mallopt).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

__all__ = ["allocator_in_use", "preload_env", "release_freed_memory", "tcmalloc_path", "without_preload"]

_M_MMAP_THRESHOLD = -3  # from <malloc.h>
_REEXEC_MARK = "DELTATUNE_ALLOCATOR_PRELOADED"
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_threshold_set = False


def tcmalloc_path() -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for directory in _LIBRARY_DIRS:
        for name in _TCMALLOC_NAMES:
            if Path(directory, name).is_file():
                return str(Path(directory, name))
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found


def preload_env(env: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute this process with so that tcmalloc replaces malloc, or None
    where that is not wanted (`DELTATUNE_MALLOC=default`), already done, or not installed."""
    if env.get("DELTATUNE_MALLOC") == "default" or env.get(_REEXEC_MARK):
        return None
    library = tcmalloc_path()
    if library is None or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return None
    preload = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return {**env, "LD_PRELOAD": preload, _REEXEC_MARK: library}


def without_preload(env: dict[str, str]) -> dict[str, str]:
    """`env` as it was before `preload_env` (for child processes that must run with the
    user's own allocator, such as the benchmark's baseline)."""
    library = env.get(_REEXEC_MARK)
    if not library:
        return dict(env)
    env = {k: v for k, v in env.items() if k != _REEXEC_MARK}
    preload = " ".join(p for p in env.get("LD_PRELOAD", "").split() if p != library)
    if preload:
        env["LD_PRELOAD"] = preload
    else:
        env.pop("LD_PRELOAD", None)
    return env


def allocator_in_use() -> str:
    """'tcmalloc', 'glibc, 1 MiB mmap threshold' or 'glibc' (for summaries and the benchmark)."""
    try:
        if "tcmalloc" in Path("/proc/self/maps").read_text():
            return "tcmalloc"
    except OSError:
        pass
    return "glibc, 1 MiB mmap threshold" if _threshold_set else "glibc"


def release_freed_memory(threshold: int = 1 << 20) -> bool:
    """Under glibc, fix its mmap threshold at `threshold` bytes for this process (once), so RSS
    follows live tensors. False where tcmalloc already does that, there is no glibc, or
    `DELTATUNE_MALLOC=default`."""
    global _threshold_set
    if _threshold_set:
        return True
    if os.environ.get("DELTATUNE_MALLOC") == "default" or allocator_in_use() == "tcmalloc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _threshold_set = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        _threshold_set = False
    return _threshold_set
