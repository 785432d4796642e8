"""Recipes: one readable loop per stage family. `STAGES` maps `stage:` to its entry point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltatune.config import RunConfig

__all__ = ["STAGES", "run_stage"]


def _sft(cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from deltatune.recipes import sft

    return sft.run(cfg, log)


STAGES: dict[str, Callable[[RunConfig, Callable[[str], None]], dict[str, Any]]] = {
    "sft": _sft,
}


def run_stage(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe of `cfg.stage` and return the run's summary."""
    return STAGES[cfg.stage](cfg, log)
